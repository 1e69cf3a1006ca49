"""Synthetic chest CT from four "scanners": small volumes with a mediastinal tumour-like blob.

``write_synthetic_ct`` writes the ``ct_nifti`` layout (or, with ``layout="slices"``, the
``ct_slices`` layout with 16-bit PNGs holding ``HU − hu_min``)::

    <out>/<Site>/image/<study>.nii.gz   int16 Hounsfield units, size × size × slices
    <out>/<Site>/label/<study>.nii.gz   uint8: 0 background, 1 tumour

Axes of every volume: axis 0 (rows) runs front to back (anterior → posterior: the spine sits
at high row numbers), axis 1 (columns) from the patient's right to left (radiological display),
the last axis head→feet; the NIfTI affine says the same (orientation codes P, L, I), so a viewer that
follows it shows the front of the chest at the top. Anatomy per study (axial slices): air outside an elliptical body (fat rim
−100 HU, soft tissue 40 HU), two lungs (−850 HU) that shrink towards both ends, the mediastinum
between them (30 HU), a vertebra (700 HU) behind it, and in about two studies out of three a
tumour-like ellipsoid blob in the mediastinum (60–90 HU, lobulated) that covers some of the
slices, so sites hold positive and negative slices. Scanner differences per site: noise (HU),
reconstruction kernel (Gaussian blur, or a sharpening kernel that overshoots edges), an HU
calibration offset, and slice thickness (fewer, thicker slices averaged along the axis).
Deterministic: every study is drawn from ``numpy.random.default_rng`` streams derived from ``seed``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from relaylearn.data.synth import check_site_targets, publish_staged_sites
from relaylearn.errors import DataError

SCAN_LENGTH_MM = 60.0  # cranio-caudal extent of every synthetic scan


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner renders the same anatomy."""

    noise_hu: float  # sigma of additive Gaussian noise
    kernel: float  # > 0: Gaussian blur sigma in pixels at 64 px (soft kernel); < 0: sharpening amount
    hu_offset: float  # calibration offset added to every voxel
    slice_mm: float  # slice thickness = spacing


SCANNERS = {
    "CT1": Scanner(noise_hu=12.0, kernel=0.6, hu_offset=0.0, slice_mm=2.5),
    "CT2": Scanner(noise_hu=30.0, kernel=-0.8, hu_offset=25.0, slice_mm=5.0),
    "CT3": Scanner(noise_hu=20.0, kernel=1.4, hu_offset=-30.0, slice_mm=3.0),
    "CT4": Scanner(noise_hu=45.0, kernel=0.3, hu_offset=15.0, slice_mm=2.0),
}
STUDIES_PER_SITE = 10
MAX_STUDIES_PER_SITE = 10_000  # the random streams of all studies are drawn up front


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _render_study(rng: np.random.Generator, size: int, scanner: Scanner) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16 [size, size, Z], label uint8 [size, size, Z]) of one study."""
    depth = max(4, int(round(SCAN_LENGTH_MM / scanner.slice_mm)))
    fine = depth * 2  # render at half the slice thickness, then average pairs (partial volume)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # 0..1
    body_ry, body_rx = rng.uniform(0.30, 0.36), rng.uniform(0.42, 0.47)
    cy, cx = 0.5 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.02, 0.02)
    has_tumour = rng.random() < 0.67
    t_centre = (cy + rng.uniform(-0.08, 0.02), cx + rng.uniform(-0.04, 0.04), rng.uniform(0.3, 0.7))
    t_radius = (rng.uniform(0.05, 0.09), rng.uniform(0.05, 0.09), rng.uniform(0.12, 0.25))
    t_hu = rng.uniform(60, 90)
    lobes = rng.uniform(0.0, 0.25, size=3)
    hu = np.empty((size, size, fine), np.float32)
    label = np.zeros((size, size, fine), np.uint8)
    for z in range(fine):
        zf = (z + 0.5) / fine
        lung_scale = 0.55 + 0.45 * np.sin(np.pi * zf)  # lungs smaller at both ends
        body = _ellipse(yy, xx, cy, cx, body_ry, body_rx)
        inner = _ellipse(yy, xx, cy, cx, body_ry - 0.03, body_rx - 0.03)
        s = np.full((size, size), -1000.0, np.float32)
        s[body] = -100.0
        s[inner] = 40.0
        for side in (-1, 1):
            lung = _ellipse(yy, xx, cy - 0.01, cx + side * 0.2, 0.22 * lung_scale, 0.13 * lung_scale)
            s[lung] = -850.0
        mediastinum = _ellipse(yy, xx, cy - 0.02, cx, 0.2 * lung_scale + 0.05, 0.07)
        s[mediastinum & inner] = 30.0
        s[_ellipse(yy, xx, cy + body_ry - 0.09, cx, 0.05, 0.05)] = 700.0  # vertebra
        if has_tumour:
            dz = (zf - t_centre[2]) / t_radius[2]
            if abs(dz) < 1:
                r = np.sqrt(1 - dz * dz)
                angle = np.arctan2(yy - t_centre[0], xx - t_centre[1])
                wobble = 1 + lobes[0] * np.sin(3 * angle + lobes[1] * 10) * 0.5
                blob = ((yy - t_centre[0]) / (t_radius[0] * r * wobble)) ** 2 + ((xx - t_centre[1]) / (t_radius[1] * r * wobble)) ** 2 <= 1
                blob &= inner
                s[blob] = t_hu
                label[blob, z] = 1
        hu[:, :, z] = s
    hu = hu.reshape(size, size, depth, 2).mean(axis=3)
    label = (label.reshape(size, size, depth, 2).max(axis=3) > 0).astype(np.uint8)
    sigma = abs(scanner.kernel) * size / 64
    if scanner.kernel > 0:
        hu = gaussian_filter(hu, sigma=(sigma, sigma, 0))
    elif scanner.kernel < 0:  # sharp kernel: unsharp masking overshoots at edges
        hu = hu + abs(scanner.kernel) * (hu - gaussian_filter(hu, sigma=(size / 64, size / 64, 0)))
    hu = hu + rng.normal(0.0, scanner.noise_hu, hu.shape).astype(np.float32) + scanner.hu_offset
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def _save_nifti(path: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> None:
    import nibabel as nib

    # RAS+ world axes (x: towards the right, y: anterior, z: superior); the array's rows run to
    # posterior (−y), its columns to the patient's left (−x), its slices to the feet (−z)
    affine = np.zeros((4, 4))
    affine[1, 0], affine[0, 1], affine[2, 2], affine[3, 3] = -spacing[0], -spacing[1], -spacing[2], 1.0
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _save_slices(folder: Path, hu: np.ndarray, label: np.ndarray, hu_min: float) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for z in range(hu.shape[2]):
        pixels = np.clip(hu[:, :, z].astype(np.int32) - int(hu_min), 0, 65535).astype(np.uint16)
        Image.fromarray(pixels).save(folder / f"{z:03d}.png")
        Image.fromarray(label[:, :, z]).save(folder / f"mask_{z:03d}.png")


def write_synthetic_ct(
    out_dir: str | Path,
    size: int = 64,
    seed: int = 0,
    studies: int | dict[str, int] = STUDIES_PER_SITE,
    layout: str = "nifti",
    hu_min: float = -160.0,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write four synthetic CT sites (``CT1``..``CT4``) under ``out_dir``.

    ``studies``: studies per site (or {site: n}); ``layout``: ``"nifti"`` (``ct_nifti``) or
    ``"slices"`` (``ct_slices``: study folders of 16-bit PNGs = HU − ``hu_min`` and ``mask_*.png``).
    Returns {site: {"studies", "slices", "positive_slices"}}. Sites are written to a temporary
    folder and renamed into place; an existing non-empty site folder is an error unless ``overwrite``.
    """
    if size < 16 or size > 1024:
        raise DataError(f"synthetic CT size must be 16..1024 pixels, got {size}")
    if layout not in ("nifti", "slices"):
        raise DataError(f"unknown synthetic CT layout '{layout}' (nifti or slices)")
    counts = {site: studies for site in SCANNERS} if isinstance(studies, int) else dict(studies)
    for site, n in counts.items():
        if site not in SCANNERS:
            raise DataError(f"unknown synthetic CT site '{site}' (known: {', '.join(SCANNERS)})")
        if n < 2:
            raise DataError(f"synthetic CT site '{site}' needs at least 2 studies (one to train, one to test), got {n}")
        if n > MAX_STUDIES_PER_SITE:
            raise DataError(f"synthetic CT site '{site}': at most {MAX_STUDIES_PER_SITE} studies, got {n}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder", out)
    check_site_targets(out, counts, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, int]] = {}
    staging = Path(tempfile.mkdtemp(prefix=".synth-ct-", dir=out))
    try:
        for site, n in counts.items():
            scanner = SCANNERS[site]
            site_index = list(SCANNERS).index(site)
            site_dir = staging / site
            slices = positives = 0
            if layout == "nifti":
                (site_dir / "image").mkdir(parents=True)
                (site_dir / "label").mkdir(parents=True)
            for i, stream in enumerate(np.random.SeedSequence([seed, site_index]).spawn(n)):
                hu, label = _render_study(np.random.default_rng(stream), size, scanner)
                study = f"{site.lower()}_{i:03d}"
                pixel_mm = 320.0 / size
                if layout == "nifti":
                    _save_nifti(site_dir / "image" / f"{study}.nii.gz", hu, (pixel_mm, pixel_mm, scanner.slice_mm))
                    _save_nifti(site_dir / "label" / f"{study}.nii.gz", label, (pixel_mm, pixel_mm, scanner.slice_mm))
                else:
                    _save_slices(site_dir / study, hu, label, hu_min)
                slices += hu.shape[2]
                positives += int(label.reshape(-1, hu.shape[2]).any(axis=0).sum())
            summary[site] = {"studies": n, "slices": slices, "positive_slices": positives}
        publish_staged_sites(staging, out, counts)
        info = {
            "generator": "relaylearn synthetic CT",
            "seed": seed,
            "size": size,
            "layout": layout,
            "sites": summary,
            "scanners": {s: SCANNERS[s].__dict__ for s in counts},
        }
        tmp_json = staging / "synth_ct.json"
        tmp_json.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp_json, out / "synth_ct.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
