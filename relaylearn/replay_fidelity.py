"""Replay fidelity: do the generators still produce usable pairs of an earlier site?

For an earlier site s, ``N`` (image, mask) pairs are generated for s and an *oracle* for s — a
solver that segments s's real images well, in a simulated relay the run's own solver right after
training on s — segments the generated images. Fidelity is the mean sample-wise foreground Dice
between the oracle's prediction and the generated mask: high when the generated image really
shows the anatomy its mask claims. The classes scored are the run's (``first_class``..K−1, see
:meth:`relaylearn.data.layouts.Layout.first_scored_class`), as for R. It is read next to the *reference*, the oracle's Dice on s's
real test images (the best a perfect generator could score).

``metrics/replay.json`` of a run holds ``F[k][s]`` (after hop k, for site s, training order;
null where s ≥ k), the references and the generated vs real class fractions. A drop of F[·][s]
along the hops is *replay drift*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from relaylearn.metrics import dice_per_image

#: default number of generated pairs per site and hop (``test.replay_fidelity_samples``)
DEFAULT_SAMPLES = 256
#: a final fidelity this much (absolute Dice) below the first one after the site counts as drift
DRIFT_TOLERANCE = 0.05


class ReplaySource(Protocol):
    """Anything that generates labelled pairs of a known site (the relay strategy)."""

    def generate_replay(self, site: int | str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]: ...


@dataclass
class FidelityScore:
    """Scores of N generated pairs of one site.

    ``per_sample``: float64 [N] sample-wise foreground Dice (oracle prediction vs generated mask);
    ``class_fractions``: fraction of generated mask pixels per class, length num_classes.
    """

    fidelity: float
    per_sample: Tensor
    class_fractions: list[float]


def class_fractions(masks: Tensor, num_classes: int) -> list[float]:
    """Fraction of pixels of each class in masks [N,H,W] (ids), length ``num_classes``."""
    counts = torch.bincount(masks.reshape(-1).long(), minlength=num_classes)[:num_classes].double()
    return (counts / counts.sum().clamp_min(1)).tolist()


@torch.no_grad()
def oracle_dice(oracle: nn.Module, images: Tensor, masks: Tensor, num_classes: int, batch_size: int = 64, device: Any = "cpu", first_class: int = 1) -> Tensor:
    """Sample-wise foreground Dice [N] of ``oracle``'s argmax prediction on images [N,C,H,W]
    against masks [N,H,W] (mean over the scored classes ``first_class``..K−1; 1 for a class absent from both)."""
    from relaylearn.engine import predict_logits

    pred = predict_logits(oracle, images, batch_size=batch_size, device=device).argmax(1).cpu()  # in eval mode
    return dice_per_image(pred, masks.cpu(), num_classes, first_class).mean(1)


def replay_fidelity(
    source: ReplaySource,
    site: int | str,
    oracle: nn.Module,
    num_classes: int,
    n: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = 64,
    device: Any = "cpu",
    first_class: int = 1,
) -> FidelityScore:
    """Generate ``n`` pairs of ``site`` from ``source`` and score them with ``oracle`` (classes ``first_class``..K−1)."""
    images, masks = source.generate_replay(site, n, seed=seed)
    per_sample = oracle_dice(oracle, images, masks, num_classes, batch_size=batch_size, device=device, first_class=first_class)
    fidelity = float(per_sample.mean()) if per_sample.numel() else math.nan
    return FidelityScore(fidelity, per_sample, class_fractions(masks, num_classes))


def replay_drift(fidelity: list[list[float | None]], sites: list[str], tolerance: float = DRIFT_TOLERANCE) -> dict[str, float]:
    """Sites whose fidelity fell along the hops: {site: first − last} where that exceeds ``tolerance``.

    ``fidelity`` is F of replay.json (rows = hops, columns = sites, None where not defined).
    """
    drift: dict[str, float] = {}
    for s, name in enumerate(sites):
        column = [row[s] for row in fidelity if s < len(row) and row[s] is not None]
        if len(column) >= 2 and column[0] - column[-1] > tolerance:
            drift[name] = float(column[0] - column[-1])
    return drift


def final_fidelity(replay: dict[str, Any], relative: bool = False) -> dict[str, float]:
    """The last hop's F per earlier site, {site: F} (divided by the site's reference if ``relative``;
    sites without a reference are left out then)."""
    rows = replay.get("fidelity") or []
    if not rows:
        return {}
    sites, refs = replay.get("sites") or [], replay.get("reference") or []
    out: dict[str, float] = {}
    for s, f in enumerate(rows[-1]):
        if f is None:
            continue
        if relative:
            ref = refs[s] if s < len(refs) else None
            if not ref:
                continue
            f = f / ref
        out[sites[s] if s < len(sites) else str(s)] = float(f)
    return out


def mean_final_fidelity(replay: dict[str, Any], relative: bool = False) -> float | None:
    """Mean over earlier sites of the last hop's F (divided by each site's reference if ``relative``)."""
    values = list(final_fidelity(replay, relative).values())
    return float(sum(values) / len(values)) if values else None


def sample_grid(images: Tensor, masks: Tensor, out_range: tuple[float, float]) -> Any:
    """uint8 [2H, n·W, 3]: generated images (top row) over their colour-coded masks."""
    import numpy as np

    from relaylearn.imaging import colour_mask, rgb_or_grey, to_uint8

    top = np.concatenate([rgb_or_grey(im) for im in to_uint8(images, out_range)], axis=1)
    if top.ndim == 2:  # one-channel (CT) images: grey in all three channels, beside colour masks
        top = np.repeat(top[..., None], 3, axis=2)
    bottom = np.concatenate([colour_mask(m) for m in masks.numpy()], axis=1)
    return np.concatenate([top, bottom], axis=0)


class FidelityRecorder:
    """Replay fidelity of a relay simulated on one machine, hop after hop.

    Keeps one oracle per trained site (the solver right after that site, ``<run>/oracles/``, local
    only, never shipped), and after every hop k scores the generators leaving hop k on every
    earlier site. Writes ``<run>/metrics/replay.json`` and a sample grid per hop and earlier site
    (``<run>/metrics/replay_samples/hop<k>_site<s>.png``, 1-based, training order).
    ``first_class``: the lowest class scored (as for R).
    """

    GRID = 8  # pairs shown per site and hop

    def __init__(
        self,
        run_dir,
        num_classes: int,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        resume: bool = False,
        out_range: tuple[float, float] = (-1.0, 1.0),
        first_class: int = 1,
    ):
        import json
        from pathlib import Path

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics" / "replay.json"
        self.num_classes, self.samples, self.seed, self.out_range, self.first_class = num_classes, samples, seed, out_range, first_class
        self.data: dict[str, Any] = {
            "metric": "oracle foreground Dice on generated pairs",
            "samples": samples,
            "sites": [],
            "fidelity": [],
            "reference": [],
            "class_fractions": {"real": [], "generated": []},
            "drift": {},
        }
        if resume and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                pass  # unreadable: recomputed for the hops trained from now on

    def oracle_path(self, position: int):
        return self.run_dir / "oracles" / f"site_{position}.safetensors"

    def record(self, position: int, site: str, strategy: nn.Module, reference: float | None, train_masks: Tensor, log_scalar=None) -> dict[str, Any]:
        """After hop ``position`` (0-based) at ``site``: save its oracle, score every earlier site.

        ``strategy`` must have ``solver`` and ``generate_replay``; ``reference``: the solver's Dice on
        the site's real test images (None if it has none); ``train_masks`` [N,H,W]: the site's
        training masks (real class fractions); ``log_scalar(tag, value, step)``: e.g. TensorBoard.
        """
        import copy

        from safetensors.torch import load_file, save_file

        from relaylearn.files import atomic_write
        from relaylearn.imaging import png_bytes

        self.oracle_path(position).parent.mkdir(parents=True, exist_ok=True)
        tmp = self.oracle_path(position).with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in strategy.solver.state_dict().items()}, str(tmp))
        tmp.replace(self.oracle_path(position))
        d = self.data
        d["sites"] = d["sites"][:position] + [site]
        d["reference"] = d["reference"][:position] + [reference]
        d["class_fractions"]["real"] = d["class_fractions"]["real"][:position] + [class_fractions(train_masks, self.num_classes)]
        row: list[float | None] = [None] * (position + 1)
        generated: list[list[float] | None] = [None] * (position + 1)
        oracle = copy.deepcopy(strategy.solver).cpu()
        for s in range(position):
            oracle.load_state_dict(load_file(str(self.oracle_path(s))))
            score = replay_fidelity(strategy, d["sites"][s], oracle, self.num_classes, n=self.samples, seed=self.seed + s, first_class=self.first_class)
            row[s], generated[s] = score.fidelity, score.class_fractions
            images, masks = strategy.generate_replay(d["sites"][s], self.GRID, seed=self.seed + s)
            atomic_write(
                self.run_dir / "metrics" / "replay_samples" / f"hop{position + 1}_site{s + 1}.png", png_bytes(sample_grid(images, masks, self.out_range))
            )
            if log_scalar is not None:
                log_scalar(f"replay/fidelity/{d['sites'][s]}", score.fidelity, position + 1)
                if d["reference"][s]:
                    log_scalar(f"replay/fidelity_ratio/{d['sites'][s]}", score.fidelity / d["reference"][s], position + 1)
        rows = [r + [None] * (position + 1 - len(r)) for r in d["fidelity"][:position]]
        d["fidelity"] = rows + [row]
        gens = [g + [None] * (position + 1 - len(g)) for g in d["class_fractions"]["generated"][:position]]
        d["class_fractions"]["generated"] = gens + [generated]
        d["drift"] = replay_drift(d["fidelity"], d["sites"])
        self._write()
        return d

    def _write(self) -> None:
        import json

        from relaylearn.files import atomic_write

        atomic_write(self.path, json.dumps(self.data, indent=2).encode("utf-8"))
