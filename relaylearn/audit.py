"""``relaylearn audit``: what does a relay bundle reveal about one hospital's training images?

Run at one hospital, on its own train and test splits, for its own site id in the bundle's site
registry (no other site's data is needed). Three kinds of check:

* **Memorisation.** M pairs are generated for the site. For every generated image: the distance
  to its nearest training image (gen→train); for every test image: the distance to its nearest
  training image (test→train), the reference of an unseen image of the same site. Reported: both
  distributions (quantiles), the ratio of their medians (< 1: generated images sit closer to the
  training set than unseen real images do) and the share of *near copies*: generated images
  closer to a training image than the 5th percentile of test→train distances. A generator that
  draws fresh images of the site's distribution gives about 5 % near copies by construction, so a
  share whose 95 % interval lies above 5 % is flagged (without intervals, ``n_bootstrap`` 0: a
  share above 5 %). Images are compared in pixel space (RMS
  difference) and in the feature space of the bundle's own solver (its encoder's deepest stage,
  average-pooled); label maps by the share of pixels whose class differs.
* **Membership inference, black box** (GAN-Leaks, Chen et al. 2020): every train and test image
  is scored by its distance to the nearest of the M generated images; the ROC AUC of that score
  separating train (members) from test (non-members). 0.5 = nothing learnt about membership.
* **Membership inference, white box** (LOGAN, Hayes et al. 2019), only when the discriminators
  travel: the score is the site-conditioned discriminator's logit (image discriminator on
  (image, mask) pairs; label discriminator on masks).

Every figure has a 95 % stratified bootstrap interval; an AUC above the threshold (default 0.6)
is flagged. The per-hop audit of a simulated relay (:func:`audit_after_hop`) writes
``metrics/privacy.json`` in the run folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relaylearn.bundle import escape_text
from relaylearn.config import MAX_AUDIT_PAIRS
from relaylearn.errors import UserError
from relaylearn.metrics import bootstrap_statistic, roc_auc
from relaylearn.models import in_eval_mode

SCHEMA = "relaylearn-privacy-audit/1"
#: percentile of test→train distances below which a generated image counts as a near copy
NEAR_COPY_PERCENTILE = 5.0
#: quantiles stored for each distance distribution
QUANTILES = tuple(range(0, 101, 5))
CLOSEST_PAIRS = 8


@dataclass
class AuditOptions:
    n_generated: int = 1000  # M generated pairs
    threshold: float = 0.6  # AUC above this is flagged
    n_bootstrap: int = 1000
    level: float = 0.95
    seed: int = 0  # latents of the generated pairs and the bootstrap
    batch_size: int = 250

    def __post_init__(self):
        if not 2 <= self.n_generated <= MAX_AUDIT_PAIRS:
            raise UserError(f"--n-generated {self.n_generated}: expected 2 to {MAX_AUDIT_PAIRS} generated pairs")
        if not 0.5 <= self.threshold <= 1.0:
            raise UserError(f"--threshold {self.threshold}: expected an AUC between 0.5 and 1")


@dataclass
class SplitData:
    """One site's real images [N,C,H,W] in the model's out_range and class ids [N,H,W]."""

    images: Tensor
    labels: Tensor


@dataclass
class AuditResult:
    report: dict[str, Any]  # JSON-able figures (schema SCHEMA)
    closest_pairs: np.ndarray = field(repr=False)  # uint8 [H', W', 3]: generated above, train below


# ----- the generated pairs (the one place that talks to the relay strategy's generators) -------
@torch.no_grad()
def generate_site_pairs(strategy, site_id: int, n: int, seed: int, batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """n pairs (images [n,C,H,W] in the solver's input range, class ids [n,H,W]) for one site id,
    drawn from the strategy's *current* generators exactly as replay draws them (the relay
    strategy's ``generate_replay``). Deterministic for ``seed``; the global RNG is untouched."""
    return strategy.generate_replay(site_id, n, seed=seed, batch_size=batch_size)


# ----- distances and scores ------------------------------------------------------------------------
def nearest(query: Tensor, reference: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Euclidean distance [Q] from each row of query [Q,D] to its nearest row of reference [R,D],
    and that row's index [Q]."""
    dists, index = [], []
    ref = reference.double()
    for start in range(0, query.shape[0], chunk):
        d = torch.cdist(query[start : start + chunk].double(), ref)
        best = d.min(dim=1)
        dists.append(best.values)
        index.append(best.indices)
    return torch.cat(dists).float(), torch.cat(index)


def pixel_vectors(images: Tensor) -> Tensor:
    """Images [N,C,H,W] → [N, C·H·W] scaled so that Euclidean distance = RMS pixel difference."""
    flat = images.reshape(images.shape[0], -1).float()
    return flat / math.sqrt(flat.shape[1])


def label_vectors(labels: Tensor, num_classes: int) -> Tensor:
    """Class ids [N,H,W] → [N, K·H·W] such that squared distance = share of pixels whose class differs."""
    one_hot = F.one_hot(labels.long(), num_classes).float().reshape(labels.shape[0], -1)
    return one_hot / math.sqrt(2 * labels[0].numel())


@torch.no_grad()
def encoder_features(solver: nn.Module, images: Tensor, batch_size: int = 250) -> Optional[Tensor]:
    """Solver encoder features [N, F] (deepest stage, average-pooled), or None when the solver
    has no ``encoder`` returning feature maps."""
    encoder = getattr(solver, "encoder", None)
    if not isinstance(encoder, nn.Module):
        return None
    device = next(solver.parameters()).device
    out = []
    with in_eval_mode(solver):
        for start in range(0, images.shape[0], batch_size):
            maps = encoder(images[start : start + batch_size].to(device))
            deepest = maps[-1] if isinstance(maps, (list, tuple)) else maps
            if not isinstance(deepest, Tensor) or deepest.ndim != 4:
                return None
            out.append(deepest.float().mean(dim=(2, 3)).cpu())
    return torch.cat(out)


# ----- the checks ----------------------------------------------------------------------------------
def _interval(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "low": low, "high": high}


def _near_copy_share(gen_to_train: np.ndarray, test_to_train: np.ndarray) -> float:
    return float(np.mean(gen_to_train < np.percentile(test_to_train, NEAR_COPY_PERCENTILE)))


def _median_ratio(gen_to_train: np.ndarray, test_to_train: np.ndarray) -> float:
    reference = float(np.median(test_to_train))
    return float(np.median(gen_to_train)) / reference if reference > 0 else math.inf


def memorisation_check(space: str, generated: Tensor, train: Tensor, test: Tensor, options: AuditOptions, seed: int) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Memorisation in one space (rows are vectors). Returns (check, gen→train distances [M],
    index of each generated row's nearest train row [M])."""
    gen_d, gen_idx = nearest(generated, train)
    test_d, _ = nearest(test, train)
    g, t = gen_d.numpy().astype(np.float64), test_d.numpy().astype(np.float64)
    ratio = bootstrap_statistic(_median_ratio, [g, t], options.n_bootstrap, options.level, seed)
    copies = bootstrap_statistic(_near_copy_share, [g, t], options.n_bootstrap, options.level, seed + 1)
    reference = NEAR_COPY_PERCENTILE / 100
    bounded = not math.isnan(copies[1])  # no interval with n_bootstrap 0: the share itself decides, as the AUC does for membership
    check = {
        "check": "memorisation",
        "space": space,
        "flagged": bool((copies[1] if bounded else copies[0]) > reference),
        "rule": f"flagged when {f'the {options.level:.0%} interval of ' if bounded else ''}the near-copy share lies above {reference:.0%} (what fresh images of the site give)",
        "ratio_of_medians": _interval(*ratio),
        "near_copies": _interval(*copies),
        "near_copy_distance": float(np.percentile(t, NEAR_COPY_PERCENTILE)),
        "distributions": {
            "quantiles": list(QUANTILES),
            "generated_to_train": [float(v) for v in np.percentile(g, QUANTILES)],
            "test_to_train": [float(v) for v in np.percentile(t, QUANTILES)],
        },
    }
    return check, gen_d, gen_idx


def membership_check(attack: str, space: str, member_scores: np.ndarray, non_member_scores: np.ndarray, options: AuditOptions, seed: int) -> dict[str, Any]:
    """ROC AUC of scores (higher = "was in the training set") separating train from test."""
    auc = bootstrap_statistic(roc_auc, [member_scores, non_member_scores], options.n_bootstrap, options.level, seed)
    return {
        "check": attack,
        "space": space,
        "flagged": bool(auc[0] > options.threshold),
        "rule": f"flagged when the AUC exceeds {options.threshold:.2f}",
        "auc": _interval(*auc),
    }


def audit_generated(
    generated: SplitData,
    train: SplitData,
    test: SplitData,
    num_classes: int,
    options: AuditOptions,
    features: Callable[[Tensor], Optional[Tensor]] | None = None,
    discriminators: dict[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
    out_range: tuple[float, float] = (-1.0, 1.0),
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """All checks for M generated pairs against one site's train and test splits (images in
    ``out_range``).

    ``features(images [N,C,H,W]) -> [N,F]`` adds the feature-space checks; ``discriminators``
    maps "image"/"label" to ``score(images, labels) -> logits [N]`` for the white-box attack.
    Returns (checks, closest-pairs picture uint8 [H',W',3]).
    """
    checks: list[dict[str, Any]] = []
    seed = options.seed
    gen_px, train_px, test_px = pixel_vectors(generated.images), pixel_vectors(train.images), pixel_vectors(test.images)
    check, gen_d, gen_idx = memorisation_check("image pixels", gen_px, train_px, test_px, options, seed)
    checks.append(check)
    picture = closest_pairs_picture(generated.images, train.images, gen_d, gen_idx, out_range=out_range)
    spaces = [("image pixels", gen_px, train_px, test_px)]
    feats = [features(x) for x in (generated.images, train.images, test.images)] if features is not None else [None]
    if all(f is not None for f in feats):
        checks.append(memorisation_check("image features", *feats, options, seed + 10)[0])
        spaces.append(("image features", *feats))
    lab = [label_vectors(d.labels, num_classes) for d in (generated, train, test)]
    checks.append(memorisation_check("label maps", *lab, options, seed + 20)[0])
    spaces.append(("label maps", *lab))
    for k, (space, gen, tr, te) in enumerate(spaces):
        # GAN-Leaks: closer to some generated sample = more likely a member (score = -distance)
        member = -nearest(tr, gen)[0].numpy()
        non_member = -nearest(te, gen)[0].numpy()
        checks.append(membership_check("membership black box", space, member, non_member, options, seed + 30 + k))
    for k, (kind, score) in enumerate((discriminators or {}).items()):
        member = score(train.images, train.labels).numpy()
        non_member = score(test.images, test.labels).numpy()
        checks.append(membership_check("membership white box", f"{kind} discriminator", member, non_member, options, seed + 40 + k))
    return checks, picture


def closest_pairs_picture(
    generated: Tensor, train: Tensor, distances: Tensor, nearest_index: Tensor, count: int = CLOSEST_PAIRS, out_range: tuple[float, float] = (-1.0, 1.0)
) -> np.ndarray:
    """The ``count`` generated images closest to a training image (top row, closest first) above
    their nearest training image (bottom row), images [N,C,H,W] in ``out_range``:
    uint8 [2·H+gap, count·(W+gap), 3]."""
    from relaylearn.imaging import to_uint8

    order = torch.argsort(distances)[:count]
    gap = 2

    def rgb(x: Tensor) -> np.ndarray:  # [C,H,W] → uint8 [H,W,3]
        x = to_uint8(x[None], out_range)[0]
        return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[..., :3]

    h, w = generated.shape[-2:]
    canvas = np.full((2 * h + gap, len(order) * (w + gap), 3), 255, dtype=np.uint8)
    for col, i in enumerate(order.tolist()):
        x0 = col * (w + gap)
        canvas[:h, x0 : x0 + w] = rgb(generated[i])
        canvas[h + gap :, x0 : x0 + w] = rgb(train[int(nearest_index[i])])
    return canvas


# ----- one site of a strategy ------------------------------------------------------------------------
def audit_site(strategy, site: str, train: SplitData, test: SplitData, options: AuditOptions, discriminators_travel: bool) -> AuditResult:
    """Audit the generators (and, if they travel, the discriminators) of a replaying ``strategy``
    for one site it can replay (``strategy.replay_sites()``), against that site's own train and
    test splits. ``discriminators_travel``: the bundle carries discriminators; the report's
    ``discriminators_audited`` says whether white-box checks actually ran (the strategy has
    discriminator scorers, e.g. not with ``ship_discriminators: false``)."""
    started = time.perf_counter()
    registry = strategy.replay_sites()
    if site not in registry:
        raise UserError(f"site {printable(site)!r} is not in the bundle's site registry (known: {', '.join(printable(s) for s in registry) or 'none'})")
    site_id = registry[site]
    if train.images.shape[1:] != test.images.shape[1:] or train.images.shape[0] < 2 or test.images.shape[0] < 2:
        raise UserError(
            f"site {printable(site)}: need at least 2 train and 2 test images of the same size (got {tuple(train.images.shape)} and {tuple(test.images.shape)})"
        )
    scorers = strategy.discriminator_scorers(site_id) if discriminators_travel else {}
    gen_images, gen_labels = generate_site_pairs(strategy, site_id, options.n_generated, options.seed, options.batch_size)
    if gen_images.shape[1:] != train.images.shape[1:]:
        raise UserError(
            f"site {printable(site)}: the data has images of shape {tuple(train.images.shape[1:])} but the generators make {tuple(gen_images.shape[1:])}"
        )
    data = strategy.config.dataset.kwargs
    checks, picture = audit_generated(
        SplitData(gen_images, gen_labels),
        train,
        test,
        data.num_classes,
        options,
        features=lambda x: encoder_features(strategy.solver, x, options.batch_size),
        discriminators=scorers or None,
        out_range=tuple(data.out_range),
    )
    report = {
        "schema": SCHEMA,
        "site": site,
        "site_id": site_id,
        "n_train": int(train.images.shape[0]),
        "n_test": int(test.images.shape[0]),
        "n_generated": options.n_generated,
        "threshold": options.threshold,
        "level": options.level,
        "n_bootstrap": options.n_bootstrap,
        "seed": options.seed,
        "discriminators_audited": bool(scorers),
        "checks": checks,
        "flagged": [f"{c['check']} ({c['space']})" for c in checks if c["flagged"]],
        "seconds": round(time.perf_counter() - started, 2),
    }
    return AuditResult(report, picture)


def printable(text: str) -> str:
    """Untrusted text (names read from a bundle) as one printable line of at most 200 characters."""
    return escape_text(text)[:200]


# ----- text output -----------------------------------------------------------------------------------
def _figure(check: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(statistic, value, interval) rows of one check."""

    def pct(v):
        return f"{100 * v:.1f} %"

    if "auc" in check:
        a = check["auc"]
        return [("ROC AUC", f"{a['value']:.3f}", f"[{a['low']:.3f}, {a['high']:.3f}]")]
    r, c = check["ratio_of_medians"], check["near_copies"]
    return [
        ("near copies", pct(c["value"]), f"[{pct(c['low'])}, {pct(c['high'])}]"),
        ("median gen→train / test→train", f"{r['value']:.3f}", f"[{r['low']:.3f}, {r['high']:.3f}]"),
    ]


def format_report(report: dict[str, Any]) -> str:
    """The audit as a table and one verdict line per check (plain text)."""
    lines = [
        f"Privacy audit of site {printable(report['site'])} (site id {report['site_id']}): {report['n_train']} train / {report['n_test']} test images, "
        f"{report['n_generated']} generated pairs, {report['level']:.0%} bootstrap intervals ({report['n_bootstrap']} resamples), {report['seconds']:.1f} s",
    ]
    rows = [("check", "space", "statistic", "value", "interval")]
    for check in report["checks"]:
        for i, (stat, value, interval) in enumerate(_figure(check)):
            rows.append((check["check"] if i == 0 else "", check["space"] if i == 0 else "", stat, value, interval))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        lines.append("  " + "  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("")
    for check in report["checks"]:
        verdict = "FLAGGED" if check["flagged"] else "ok     "
        lines.append(f"{verdict} {check['check']} ({check['space']}): {_figure(check)[0][0]} {_figure(check)[0][1]}; {check['rule']}")
    if not report["discriminators_audited"]:
        lines.append("(white box not run: the bundle carries no discriminators)")
    lines.append(
        f"verdict: {len(report['flagged'])} of {len(report['checks'])} checks flagged" + (f": {', '.join(report['flagged'])}" if report["flagged"] else "")
    )
    return "\n".join(lines)


# ----- the command -----------------------------------------------------------------------------------
def _site_dataset(task, site: str, data_root: str, config: Optional[str]):
    """The DatasetConfig of ``site``'s data, preprocessed as the bundle's model expects: location
    (layout, folder, ROI sub-folder) from ``config`` if given, else the folder named like the site."""
    from relaylearn.config import DatasetConfig, load_config, validate_section

    kwargs = task.dataset.kwargs.model_dump(mode="json")
    layout = task.dataset.name
    kwargs.update(root_path=str(data_root), img_folder=site, task_name=site)
    if config:
        cfg = load_config(config.lstrip("="), None, data_root)
        found = [d for d in [t.dataset for t in cfg.tasks] + list(cfg.test_datasets) if d.site == site]
        if not found:
            raise UserError(f"site {printable(site)!r} is not a site of config {config} (its sites: {', '.join(sorted({t.dataset.site for t in cfg.tasks}))})")
        mine = found[0]
        layout = mine.name
        kwargs.update(img_folder=mine.kwargs.img_folder if mine.kwargs.img_folder is not None else site, use_roi=mine.kwargs.use_roi)
    return validate_section(DatasetConfig, {"name": layout, "kwargs": kwargs}, f"site {printable(site)}'s dataset (the bundle's preprocessing)", config)


def run_audit(
    bundle_path: str,
    site: str,
    data_root: str,
    config: Optional[str] = None,
    trust: Optional[str] = None,
    options: AuditOptions | None = None,
    out_dir: Optional[str] = None,
    no_verify: bool = False,
    overwrite: bool = False,
) -> tuple[dict[str, Any], Path]:
    """``relaylearn audit``: read (verify with ``trust``) the bundle, audit ``site`` on its own data,
    write ``<out_dir>/<site>.json`` and ``<site>_closest_pairs.png`` (new files unless
    ``overwrite``; checked before any work). Returns (report, json path)."""
    from relaylearn.assembly import load_split, read_any_bundle, strategy_from_bundle
    from relaylearn.files import atomic_write_all, check_output_file, json_text
    from relaylearn.imaging import png_bytes
    from relaylearn.strategies import available_strategies, get_strategy_class

    options = options or AuditOptions()
    path = Path(bundle_path)
    out = Path(out_dir) if out_dir else Path("exps") / "audit" / path.stem
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in site)
    png, json_path = out / f"{safe}_closest_pairs.png", out / f"{safe}.json"
    exists = None if overwrite else "already exists (an earlier audit): pass --overwrite to replace it, or choose another --out"
    if out.exists() and not out.is_dir():
        raise UserError("is a file; --out names a folder", out)
    for output in (json_path, png):
        check_output_file(output, exists)
    if not Path(data_root).is_dir():
        raise UserError("--data-root: folder not found", data_root)
    bundle = read_any_bundle(path, trust, no_verify=no_verify)
    name = bundle.manifest.get("strategy")
    if not (isinstance(name, str) and name in available_strategies() and get_strategy_class(name).replays()):  # plug-ins named by a bundle are never imported
        raise UserError(f"strategy {printable(name)!r} carries no generators: only bundles of a replaying strategy (relay) can be audited", path)
    strategy, task = strategy_from_bundle(bundle)
    strategy.to("cpu")
    registry = strategy.replay_sites()
    if site not in registry:
        raise UserError(f"--site {printable(site)}: not in the bundle's site registry (known: {', '.join(printable(s) for s in registry) or 'none'})", path)
    ds = _site_dataset(task, site, data_root, config)
    train, test = load_split(ds, "train"), load_split(ds, "test")
    travels = any(name.startswith("d_img.") for name in bundle.tensors)
    result = audit_site(strategy, site, SplitData(train.images, train.labels), SplitData(test.images, test.labels), options, travels)
    result.report["bundle"] = {
        "path": str(path),
        "sha256": bundle.sha256,
        "verified": bundle.signed_by is not None,
        "hops": [printable(h.get("site", "?")) for h in bundle.manifest.get("hops", [])],
    }
    result.report["closest_pairs_png"] = str(png)
    atomic_write_all([(png, png_bytes(result.closest_pairs)), (json_path, json_text(result.report))], exists_error=exists)
    return result.report, json_path


# ----- per-hop audit of a simulated relay ------------------------------------------------------------
def audit_after_hop(strategy, tasks: list, hop: int, trained: str, run_dir: Path, load_split_fn: Callable | None = None) -> Optional[dict[str, Any]]:
    """After hop ``hop`` (1-based) of a run with every site on one machine: audit every site the
    generators know for which ``tasks`` hold its data; merge into ``run_dir/metrics/privacy.json``
    (one entry per hop, replaced on re-run) and write the closest pairs under
    ``metrics/privacy/``. No-op (None) for strategies without generators or when disabled."""
    from relaylearn.assembly import load_split
    from relaylearn.files import atomic_write, json_text
    from relaylearn.imaging import png_bytes

    cfg = tasks[0].audit
    if not cfg.after_each_hop or not strategy.replay_sites():
        return None
    load = load_split_fn or load_split
    options = AuditOptions(n_generated=cfg.n_generated, threshold=cfg.threshold, n_bootstrap=cfg.n_bootstrap, seed=tasks[0].random_seed)
    datasets = {t.dataset.site: t.dataset for t in tasks}
    started = time.perf_counter()
    sites = {}
    for site in strategy.replay_sites():
        if site not in datasets:
            continue
        train, test = load(datasets[site], "train"), load(datasets[site], "test")
        travels = bool(strategy.discriminator_scorers(strategy.replay_sites()[site]))  # none with ship_discriminators: false
        result = audit_site(strategy, site, SplitData(train.images, train.labels), SplitData(test.images, test.labels), options, travels)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in site)
        png = Path("privacy") / f"hop{hop}_{safe}_closest_pairs.png"
        atomic_write(run_dir / "metrics" / png, png_bytes(result.closest_pairs))
        result.report["closest_pairs_png"] = str(png)
        sites[site] = result.report
    path = run_dir / "metrics" / "privacy.json"
    existing = json.loads(path.read_text()) if path.is_file() else {"schema": SCHEMA, "hops": []}
    entry = {"hop": hop, "trained": trained, "seconds": round(time.perf_counter() - started, 2), "sites": sites}
    existing["hops"] = sorted([h for h in existing.get("hops", []) if h.get("hop") != hop] + [entry], key=lambda h: h["hop"])
    atomic_write(path, json_text(existing))
    return entry


def flagged_checks(privacy: dict[str, Any]) -> int:
    """How many checks a privacy.json flags, summed over its hops and sites."""
    return sum(len(site.get("flagged", [])) for hop in privacy.get("hops") or [] for site in hop.get("sites", {}).values())


def final_mia_auc(privacy: dict[str, Any], attack: str = "membership black box", space: str = "image pixels") -> Optional[float]:
    """Mean over sites of one attack's AUC after the last audited hop of a privacy.json (None if absent)."""
    hops = privacy.get("hops") or []
    if not hops:
        return None
    values = [c["auc"]["value"] for s in hops[-1]["sites"].values() for c in s["checks"] if c["check"] == attack and c["space"] == space]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None
