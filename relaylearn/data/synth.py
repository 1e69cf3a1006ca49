"""The embedded benchmark: procedural retinal fundus optic disc / cup crops from five "hospitals".

``write_synthetic_benchmark`` writes the DoFE layout (docs/design.md#fundus-dofe)::

    <out>/<Site>/<train|test>/ROIs/image/<name>.png   RGB uint8, size × size
    <out>/<Site>/<train|test>/ROIs/mask/<name>.png    255 background, 128 disc rim, 0 cup

Sites ``Domain1``..``Domain4`` have the real DoFE train/test counts; ``Domain5`` is an external
test-only site. Every image is an ROI crop centred on the optic disc: an orange-red textured
retina, dark vessels leaving the disc, a yellowish elliptical disc and a paler cup
(cup-to-disc ratio 0.3–0.8). Each site has its own *camera look* (colour balance, brightness,
contrast, gamma, blur, vignette / illumination gradient, noise, JPEG artefacts, disc size), strong
enough that a model trained at one site loses Dice at the others. Domain1's masks are RGB, the
other sites' single-channel (both occur in the wild).

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``seed``, so a re-run
writes the same bytes (on the same Pillow / libjpeg build).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from relaylearn.errors import DataError

Range = tuple[float, float]


@dataclass(frozen=True)
class CameraLook:
    """How one site's camera and protocol render the same anatomy. Ranges are sampled per image.

    Blur and noise are given for 128-pixel images (blur in pixels, scaled with the size);
    intensities are on a 0..1 scale.
    """

    gains: tuple[float, float, float]  # white balance, multiplied per RGB channel
    brightness: Range  # multiplier
    contrast: Range  # around the image mean
    gamma: Range  # output = input ** gamma
    saturation: Range  # 0 = grey, 1 = unchanged
    blur_px: Range  # Gaussian sigma at 128 px
    vignette: Range  # darkening at the corners, 0..1
    gradient: Range  # linear illumination slope across the frame, random direction
    noise: Range  # sigma of additive Gaussian noise
    chroma_noise: float  # fraction of the noise that is independent per channel
    jpeg_quality: tuple[int, int] | None  # None: no JPEG round trip
    disc_radius: Range  # disc semi-major axis as a fraction of half the frame width
    cup_ratio: Range  # vertical cup-to-disc ratio
    offset: float  # max disc centre offset as a fraction of half the frame width
    pallor: Range  # how much paler than the rim the cup is (0..1)


# Counts (train, test) follow DoFE; Domain5 is the external, test-only site.
SITE_COUNTS: dict[str, tuple[int, int]] = {
    "Domain1": (50, 51),
    "Domain2": (99, 60),
    "Domain3": (320, 80),
    "Domain4": (320, 80),
    "Domain5": (0, 80),
}

SITE_LOOKS: dict[str, CameraLook] = {
    # Reference look: warm, moderately bright, sharp, mid-sized disc, light vignette.
    "Domain1": CameraLook(
        gains=(1.0, 1.0, 1.0),
        brightness=(0.95, 1.1),
        contrast=(1.0, 1.15),
        gamma=(0.9, 1.05),
        saturation=(0.95, 1.1),
        blur_px=(0.0, 0.4),
        vignette=(0.15, 0.3),
        gradient=(0.0, 0.1),
        noise=(0.005, 0.015),
        chroma_noise=0.3,
        jpeg_quality=None,
        disc_radius=(0.34, 0.42),
        cup_ratio=(0.35, 0.8),
        offset=0.08,
        pallor=(0.65, 0.9),
    ),
    # Dark, greenish, low contrast, large tightly-cropped disc.
    "Domain2": CameraLook(
        gains=(0.7, 1.0, 0.8),
        brightness=(0.75, 0.9),
        contrast=(0.6, 0.75),
        gamma=(1.1, 1.25),
        saturation=(0.6, 0.8),
        blur_px=(0.3, 0.8),
        vignette=(0.35, 0.55),
        gradient=(0.05, 0.2),
        noise=(0.01, 0.025),
        chroma_noise=0.2,
        jpeg_quality=None,
        disc_radius=(0.45, 0.55),
        cup_ratio=(0.3, 0.75),
        offset=0.06,
        pallor=(0.45, 0.7),
    ),
    # Bright, washed out, yellowish, blurry, small disc.
    "Domain3": CameraLook(
        gains=(1.05, 1.15, 1.1),
        brightness=(1.2, 1.4),
        contrast=(0.65, 0.8),
        gamma=(0.6, 0.75),
        saturation=(0.45, 0.65),
        blur_px=(1.2, 2.0),
        vignette=(0.0, 0.1),
        gradient=(0.0, 0.1),
        noise=(0.005, 0.012),
        chroma_noise=0.2,
        jpeg_quality=None,
        disc_radius=(0.24, 0.31),
        cup_ratio=(0.3, 0.7),
        offset=0.12,
        pallor=(0.5, 0.75),
    ),
    # High contrast, deep red, noisy, JPEG-compressed.
    "Domain4": CameraLook(
        gains=(1.0, 0.85, 0.75),
        brightness=(0.85, 1.0),
        contrast=(1.35, 1.6),
        gamma=(1.0, 1.2),
        saturation=(1.15, 1.35),
        blur_px=(0.0, 0.3),
        vignette=(0.2, 0.4),
        gradient=(0.1, 0.25),
        noise=(0.04, 0.07),
        chroma_noise=0.6,
        jpeg_quality=(35, 60),
        disc_radius=(0.3, 0.38),
        cup_ratio=(0.3, 0.8),
        offset=0.1,
        pallor=(0.5, 0.8),
    ),
    # External site: cool bluish-magenta cast, strong uneven illumination, slight blur.
    "Domain5": CameraLook(
        gains=(0.85, 0.75, 1.25),
        brightness=(0.8, 0.95),
        contrast=(0.9, 1.1),
        gamma=(0.85, 1.0),
        saturation=(0.7, 0.9),
        blur_px=(0.5, 1.0),
        vignette=(0.3, 0.5),
        gradient=(0.25, 0.4),
        noise=(0.015, 0.03),
        chroma_noise=0.4,
        jpeg_quality=(60, 80),
        disc_radius=(0.3, 0.4),
        cup_ratio=(0.3, 0.8),
        offset=0.1,
        pallor=(0.5, 0.75),
    ),
}

# Mask grey levels of the DoFE layout.
MASK_BACKGROUND, MASK_RIM, MASK_CUP = 255, 128, 0

_RETINA = np.array([0.74, 0.28, 0.11], np.float32)
_RIM = np.array([0.96, 0.56, 0.32], np.float32)
_CUP = np.array([1.0, 0.96, 0.86], np.float32)
_VESSEL = np.array([0.36, 0.05, 0.03], np.float32)


# ----- anatomy ----------------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each float32 [size, size] in -1..1."""
    t = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    y, x = np.meshgrid(t, t, indexing="ij")
    return y, x


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[size, size] noise in about -1..1, bilinearly interpolated from a (cells+1)² random grid."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size, endpoint=False) + cells / (2 * size)
    i0 = np.floor(t).astype(int)
    f = t - i0
    i1 = np.minimum(i0 + 1, cells)
    rows = grid[i0] * (1 - f)[:, None] + grid[i1] * f[:, None]  # [size, cells+1]
    return (rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]).astype(np.float32)


def _ellipse_level(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    """Normalised elliptical radius: < 1 inside the ellipse with semi-axes a (x') and b (y')."""
    c, s = math.cos(angle), math.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _inside(level: np.ndarray, sharpness: float) -> np.ndarray:
    """Soft inside-indicator of the region ``level < 1``: a logistic edge, 0.5 on the boundary."""
    return 0.5 - 0.5 * np.tanh((level - 1.0) * (0.5 * sharpness))


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angle difference mapped to -pi..pi (rint-based: float32 ``%`` is very slow in NumPy)."""
    return angle - (2 * np.pi) * np.rint(angle / (2 * np.pi))


def _vessel_darkness(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, cx: float, cy: float, temporal: float, disc_r: float) -> np.ndarray:
    """Vessel tree as a darkness map in 0..1, drawn in polar coordinates around (cx, cy).

    Each vessel is a curve ``phi(r) = phi0 + bend·r + wiggle·sin(freq·r + phase)``; a pixel at
    polar (r, phi) lies at distance ≈ r·|phi − phi(r)| from it. Four arcade vessels leave the disc
    upwards / downwards and bend towards the temporal side (``temporal`` = ±1 in x); smaller
    vessels and branches point in random directions.
    """
    dx, dy = x - cx, y - cy
    r = np.sqrt(dx * dx + dy * dy) + 1e-6
    phi = np.arctan2(dy, dx)
    # Angles: 0 = +x, +pi/2 = down (image rows grow downwards).
    toward_temporal = 0.0 if temporal > 0 else np.pi
    vessels = []  # (phi0, bend, wiggle, freq, phase, width, r_start, r_end)
    for vertical in (-np.pi / 2, np.pi / 2):  # superior and inferior arcades
        for k in range(2):  # artery and vein side by side
            phi0 = vertical + rng.uniform(-0.35, 0.35) + (k - 0.5) * 0.3
            bend = _wrap(np.array(toward_temporal - phi0)) * rng.uniform(0.25, 0.55)
            width = rng.uniform(0.028, 0.04) * (1.25 if k else 1.0)
            vessels.append((phi0, float(bend), rng.uniform(0.03, 0.1), rng.uniform(4, 9), rng.uniform(0, 6.3), width, 0.0, 3.0))
    for _ in range(rng.integers(2, 6)):  # smaller vessels, nasal and temporal
        phi0 = rng.uniform(-np.pi, np.pi)
        vessels.append(
            (
                phi0,
                rng.uniform(-0.5, 0.5),
                rng.uniform(0.02, 0.08),
                rng.uniform(4, 10),
                rng.uniform(0, 6.3),
                rng.uniform(0.014, 0.022),
                rng.uniform(0.0, 0.3 * disc_r),
                rng.uniform(0.6, 1.6),
            )
        )
    for parent in list(vessels[:4]):  # branches of the arcades
        r0 = rng.uniform(0.9, 1.8) * disc_r
        base = parent[0] + parent[1] * r0 + parent[2] * np.sin(parent[3] * r0 + parent[4])
        vessels.append((base, rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.1), 0.04, 6.0, rng.uniform(0, 6.3), parent[5] * 0.6, r0, rng.uniform(1.2, 2.5)))
    darkness = np.zeros_like(r)
    r_over_taper = r / np.clip(1.0 - 0.25 * r, 0.5, 1.0)  # vessels thin out away from the disc
    for phi0, bend, wiggle, freq, phase, width, r_start, r_end in (map(float, v) for v in vessels):
        # Branch angles are measured from the branch point, so they start on their parent.
        curve = phi0 + bend * np.maximum(r - r_start, 0.0) + wiggle * np.sin(freq * r + phase)
        z = np.abs(_wrap(phi - curve)) * r_over_taper * (1.0 / width)
        profile = np.exp(-z * z)
        if r_start > 0.0:
            profile *= np.clip((r - r_start) / 0.05 + 0.5, 0.0, 1.0)
        if r_end < 1.5:  # the frame's corners are at r <= 1.4 + offset
            profile *= np.clip((r_end - r) / 0.25 + 0.5, 0.0, 1.0)
        np.maximum(darkness, profile, out=darkness)
    return darkness


def _blend(base: np.ndarray, top: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``base`` [3, H, W] moved towards ``top`` ([3, H, W] or an RGB colour) by ``weight`` [H, W] in 0..1."""
    if top.ndim == 1:
        top = top[:, None, None]
    return base + weight[None] * (top - base)


def _render_fundus(rng: np.random.Generator, size: int, look: CameraLook) -> tuple[np.ndarray, np.ndarray]:
    """One ROI crop: (image float32 [3, H, W] in 0..1 before the camera, mask uint8 [H, W] DoFE levels)."""
    y, x = _grid(size)
    temporal = float(rng.choice([-1.0, 1.0]))  # left / right eye

    disc_a = rng.uniform(*look.disc_radius)
    disc_b = disc_a * rng.uniform(1.0, 1.2)  # discs are slightly taller than wide
    disc_angle = rng.uniform(-0.35, 0.35)
    cx, cy = (float(v) for v in rng.uniform(-look.offset, look.offset, 2))
    cdr = rng.uniform(*look.cup_ratio)
    cup_a = disc_a * cdr * rng.uniform(0.85, 1.05)
    cup_b = disc_b * cdr
    # The cup sits a little temporally, but always well inside the disc.
    shift = (1.0 - cdr) * disc_a * rng.uniform(0.0, 0.4)
    ccx, ccy = cx + temporal * shift, cy + rng.uniform(-0.05, 0.05) * (1.0 - cdr) * disc_b
    cup_angle = disc_angle + rng.uniform(-0.3, 0.3)

    disc_level = _ellipse_level(x, y, cx, cy, disc_a, disc_b, disc_angle)
    cup_level = _ellipse_level(x, y, ccx, ccy, cup_a, cup_b, cup_angle)
    disc_mask = disc_level < 1.0
    cup_mask = (cup_level < 1.0) & disc_mask

    # Retina: orange-red with choroidal texture, darker towards the macula (temporal side).
    texture = 0.09 * _smooth_noise(rng, size, 3) + 0.05 * _smooth_noise(rng, size, 9) + 0.025 * _smooth_noise(rng, size, 24)
    texture += 0.012 * rng.standard_normal((size, size), dtype=np.float32)
    tint = _RETINA * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    macula = 1.0 - 0.12 * np.clip(temporal * x + 0.3, 0.0, None)
    image = tint[:, None, None] * ((1.0 + texture) * macula)[None]

    # Peripapillary halo, rim and cup with soft edges.
    halo = np.exp(-(((disc_level - 1.08) / 0.12) ** 2)) * (0.6 * rng.uniform(0.0, 0.25))
    image = _blend(image, _RIM, halo)
    disc_soft = _inside(disc_level, 1.0 / rng.uniform(0.03, 0.05))
    rim_colour = _RIM * rng.uniform(0.92, 1.05, 3).astype(np.float32)
    rim = rim_colour[:, None, None] * (1.0 + 0.08 * _smooth_noise(rng, size, 5))[None]
    image = _blend(image, rim, disc_soft)
    cup_soft = _inside(cup_level, 1.0 / rng.uniform(0.05, 0.1)) * disc_soft
    cup_colour = rim_colour + (_CUP - rim_colour) * rng.uniform(*look.pallor)
    image = _blend(image, cup_colour, cup_soft)

    # Vessels emerge from the cup and are partly hidden in its depth.
    dark = _vessel_darkness(rng, x, y, ccx, ccy, temporal, disc_a)
    dark *= (1.0 - 0.45 * cup_soft) * rng.uniform(0.75, 0.95)
    image = _blend(image, _VESSEL, dark)

    mask = np.full((size, size), MASK_BACKGROUND, np.uint8)
    mask[disc_mask] = MASK_RIM
    mask[cup_mask] = MASK_CUP
    return image, mask


# ----- camera -----------------------------------------------------------------------------------
def _apply_camera(rng: np.random.Generator, image: np.ndarray, look: CameraLook) -> np.ndarray:
    """Site-specific acquisition: float32 [3, H, W] in 0..1 -> uint8 [H, W, 3]."""
    size = image.shape[1]
    y, x = _grid(size)
    direction = rng.uniform(0, 2 * np.pi)
    illumination = (1.0 - rng.uniform(*look.vignette) * (x * x + y * y) / 2.0) * (
        1.0 + rng.uniform(*look.gradient) * (math.cos(direction) * x + math.sin(direction) * y)
    )
    gains = (np.asarray(look.gains) * rng.uniform(0.96, 1.04, 3)).astype(np.float32)
    image = image * illumination[None] * gains[:, None, None]

    sigma = rng.uniform(*look.blur_px) * size / 128
    if sigma > 0.05:
        image = gaussian_filter(image, sigma=(0, sigma, sigma), mode="reflect")

    grey = image.mean(axis=0, keepdims=True)
    image = grey + (image - grey) * rng.uniform(*look.saturation)
    mean = float(image.mean())
    image = mean + (image - mean) * rng.uniform(*look.contrast)
    image = np.clip(image * rng.uniform(*look.brightness), 0.0, 1.0) ** rng.uniform(*look.gamma)

    noise_sigma = rng.uniform(*look.noise)
    luma = rng.standard_normal((1, size, size), dtype=np.float32)
    chroma = rng.standard_normal(image.shape, dtype=np.float32)
    image = image + noise_sigma * ((1 - look.chroma_noise) * luma + look.chroma_noise * chroma)
    pixels = np.ascontiguousarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0))

    if look.jpeg_quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(rng.integers(*look.jpeg_quality)))
        buffer.seek(0)
        pixels = np.asarray(Image.open(buffer).convert("RGB"))
    return pixels


# ----- writing ----------------------------------------------------------------------------------
def _site_is_occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_site_targets(out: Path, sites, overwrite: bool) -> None:
    """Refuse, before anything is rendered, the site folders that cannot be replaced: one that is
    a symbolic link (replacing it would delete or follow the link), and one that already holds
    something unless ``overwrite``."""
    for site in sites:
        target = out / site
        if target.is_symlink():
            raise DataError("site folder is a symbolic link; remove the link or write the sites elsewhere", target)
        if not overwrite and _site_is_occupied(target):
            raise DataError("site folder already exists and is not empty (pass --overwrite to replace it)", target)


def publish_staged_sites(staging: Path, out: Path, sites) -> None:
    """Move each fully written ``staging/<site>`` over ``out/<site>`` (replacing what was there)."""
    for site in sites:
        target = out / site
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging / site, target)


def write_synthetic_benchmark(
    out_dir: str | Path, size: int = 128, seed: int = 0, progress: bool = False, overwrite: bool = False, counts: dict[str, tuple[int, int]] | None = None
) -> dict[str, dict[str, int]]:
    """Write the five-site synthetic fundus benchmark under ``out_dir`` (DoFE layout).

    ``counts`` ({site: (train, test)}, sites among ``SITE_LOOKS``) replaces the default DoFE
    counts, e.g. for tiny test fixtures; a count of 0 leaves that split out. Returns
    ``{site: {"train": n, "test": m}}`` (splits with images only). Files are written to a
    temporary folder inside ``out_dir`` and each site folder is renamed into place at the end.
    Raises ``DataError`` if a site folder already exists and is not empty, unless ``overwrite``.
    Also writes ``out_dir/synth_benchmark.json`` (seed, size, counts).
    """
    if size < 16:
        raise DataError(f"synthetic image size must be at least 16 pixels, got {size}")
    counts = dict(SITE_COUNTS if counts is None else counts)
    for site, (train, test) in counts.items():
        if site not in SITE_LOOKS:
            raise DataError(f"unknown synthetic site '{site}' (known: {', '.join(SITE_LOOKS)})")
        if train < 0 or test < 0 or train + test == 0:
            raise DataError(f"synthetic site '{site}' needs non-negative counts and at least one image, got {(train, test)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder", out)
    check_site_targets(out, counts, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    total = sum(train + test for train, test in counts.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="synthetic fundus", unit="img", disable=None)  # None: off when not a terminal
    summary: dict[str, dict[str, int]] = {}
    staging = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    try:
        for site, site_counts in counts.items():
            look = SITE_LOOKS[site]
            site_index = list(SITE_LOOKS).index(site)  # a site's images do not depend on which others are written
            summary[site] = {}
            for split_index, (split, count) in enumerate(zip(("train", "test"), site_counts)):
                if count == 0:
                    continue
                image_dir = staging / site / split / "ROIs" / "image"
                mask_dir = staging / site / split / "ROIs" / "mask"
                image_dir.mkdir(parents=True)
                mask_dir.mkdir(parents=True)
                streams = np.random.SeedSequence([seed, site_index, split_index]).spawn(count)
                for i, stream in enumerate(streams):
                    rng = np.random.default_rng(stream)
                    scene, mask = _render_fundus(rng, size, look)
                    pixels = _apply_camera(rng, scene, look)
                    name = f"{site.lower()}_{split}_{i:04d}.png"
                    Image.fromarray(pixels).save(image_dir / name, compress_level=1)  # fast; noise barely compresses
                    mask_image = Image.fromarray(mask)
                    if site == "Domain1":
                        mask_image = mask_image.convert("RGB")
                    mask_image.save(mask_dir / name)
                    if bar is not None:
                        bar.update(1)
                summary[site][split] = count
        publish_staged_sites(staging, out, counts)
        info = {
            "generator": "relaylearn synthetic fundus",
            "seed": seed,
            "size": size,
            "sites": summary,
            "external_test_sites": [s for s, (train, _) in counts.items() if train == 0],
        }
        tmp_json = staging / "synth_benchmark.json"
        tmp_json.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp_json, out / "synth_benchmark.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if bar is not None:
            bar.close()
    return summary


def preview_grid(root: str | Path, out_png: str | Path, n: int = 4, split: str = "test") -> Path:
    """Save a PNG grid, one row per site under ``root``: ``n`` images, each followed by its mask."""
    from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

    root = Path(root)
    sites = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise DataError("no site folders to preview", root)
    fig = Figure(figsize=(2 * n * 1.2, len(sites) * 1.35))
    axes = fig.subplots(len(sites), 2 * n, squeeze=False)
    for row, site in enumerate(sites):
        folder = root / site / split / "ROIs"
        if not (folder / "image").is_dir():
            folder = root / site / "train" / "ROIs"
        names = sorted(p.name for p in (folder / "image").glob("*.png"))[:n]
        for col in range(n):
            ax_img, ax_mask = axes[row, 2 * col], axes[row, 2 * col + 1]
            if col < len(names):
                ax_img.imshow(Image.open(folder / "image" / names[col]).convert("RGB"))
                ax_mask.imshow(Image.open(folder / "mask" / names[col]).convert("L"), cmap="gray", vmin=0, vmax=255)
            for ax in (ax_img, ax_mask):
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
        axes[row, 0].set_ylabel(site, fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.2)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png
