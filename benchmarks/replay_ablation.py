"""Attribution benchmark of Relay Learning's parts on the embedded synthetic benchmark.

Twenty-six variants, each over ``--seeds`` seeds (site order of the config), through ``relaylearn
compare`` (so every run is resumable and a finished run is skipped when the command is re-run):

* ``relay`` — configs/demo/relay.yaml as is (replay + distillation, the generator average and
  snapshots);
* ``relay_previous_preset`` — the demo preset before the generator average and snapshots came in
  (``distil_weight: 0.5``, ``generator_ema_steps: 0``, ``generator_snapshots: 0``). Every other
  ``demo/relay`` variant below starts from it, the base its README figures were measured on;
* ``relay_replay_only`` — ``distil_weight: 0``;
* ``relay_no_replay`` — ``replay: false`` (merge + distillation only; its GANs get the paper's one
  G+D step per solver step and no warm-up, since nothing uses them);
* ``relay_alignment`` — ``gen_align_weight: 2`` (the generator-alignment term, not in the paper);
* ``relay_no_discriminators`` — ``ship_discriminators: false`` (what the privacy option costs);
* ``relay_first_site_warmup`` — ``gan_first_site_warmup_steps: 480`` (GAN-only steps at the
  first site, where the GANs start from scratch; not in the preset: over three seeds it did not
  help);
* ``relay_two_stages`` — ``num_stages: 2`` (the paper's schedule: the first half of every site
  without replay, then the mid-site merge);
* ``relay_quality`` — configs/demo/relay_quality.yaml (16 G+D steps per batch instead of 5);
* ``relay_quality_replay_only`` — the same with ``distil_weight: 0``;
* ``relay_quality_steps120`` — the same GAN steps per site (960) spread over twice the solver
  steps: 120 batches per site, 8 G+D steps per batch;
* ``relay_quality_append`` — the quality preset with ``solver_replay: append`` (the solver keeps
  all 16 reals of its batch and gets 16 replayed pairs on top);
* ``relay_quality_warmup`` — the quality preset with ``gan_warmup_steps: 320`` (GAN-only steps at
  the start of every site, so the generators that leave a site know it better);
* ``relay_ema`` — the previous demo preset with ``generator_ema_steps: 30`` (a moving average of the
  generators' weights leaves each site);
* ``relay_quality_long`` — the quality preset with twice the batches (120 per site, 16 G+D steps
  each);
* ``relay_quality_long_ema`` — the same with ``generator_ema_steps: 100``;
* ``relay_quality_long_preset`` — configs/demo/relay_quality_long.yaml as is (that, plus
  ``ship_discriminators: false``);
* ``relay_quality_long_replay_only`` — the long preset with ``distil_weight: 0``;
* ``relay_ema_gan6`` — the previous demo preset with ``generator_ema_steps: 30`` and 6 G+D steps per batch
  instead of 5;
* ``relay_gan8`` — the previous demo preset with 8 G+D steps per batch instead of 5;
* ``relay_gan_lr1`` — the previous demo preset with the GANs' learning rates at 0.001 (``g_lr``, ``d_lr``)
  instead of 0.002 / 0.0022;
* ``relay_snapshots`` — the previous demo preset with ``generator_snapshots: 5`` (the best of five copies of
  the generators over the last half of a site, or the final ones, leaves it);
* ``relay_ema_snapshots`` — the same with ``generator_ema_steps: 30``;
* ``relay_distil2`` — the previous demo preset with ``distil_weight: 2`` instead of 0.5 (the same replay,
  seed by seed: the GANs never see the solver);
* ``sequential`` and ``joint`` — the demo baselines.

Runs go seed by seed (all variants of seed 0 first), so an interrupted benchmark still has a
complete row per variant. After every run it rewrites ``exps/compare/<name>/ablation.md`` and
``ablation.json``: mean ± std of ACC, BWT, forgetting, external Dice (Domain5), mean final
replay fidelity (absolute and × the oracle's reference), wall time per run; and the targets:

* replay only: final fidelity ≥ 0.8 × reference for every earlier site, forgetting ≤ 1/3 of
  sequential's (means over seeds);
* relay: ACC ≥ joint ACC − 0.05 and forgetting ≤ 0.05.

    python benchmarks/replay_ablation.py --seeds 3 --data-root data/synth
    python benchmarks/replay_ablation.py --seeds 3 --only relay,sequential --steps 120 --name abl120
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path[:1]:  # run from a checkout without installing: this checkout's relaylearn first
    sys.path.insert(0, str(ROOT))

from relaylearn.compare import compare_strategies  # noqa: E402
from relaylearn.files import atomic_write  # noqa: E402
from relaylearn.replay_fidelity import final_fidelity, mean_final_fidelity  # noqa: E402
from relaylearn.results import external_dice  # noqa: E402

#: variant -> (config, extra overrides)
#: configs/demo/relay.yaml as it was before its generator average, snapshots, distillation weight 2 and reused D-step fakes
PREVIOUS_DEMO = [
    "strategy.kwargs.distil_weight=0.5",
    "strategy.kwargs.generator_ema_steps=0",
    "strategy.kwargs.generator_snapshots=0",
    "strategy.kwargs.d_step_fakes=fresh",
]

#: variant -> (config, extra overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "relay": ("demo/relay", []),
    "relay_previous_preset": ("demo/relay", PREVIOUS_DEMO),
    "relay_replay_only": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.distil_weight=0"]),
    "relay_no_replay": (
        "demo/relay",
        [*PREVIOUS_DEMO, "strategy.kwargs.replay=false", "strategy.kwargs.gan_steps_per_solver_step=1", "strategy.kwargs.gan_first_site_warmup_steps=0"],
    ),
    "relay_alignment": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.gen_align_weight=2"]),
    "relay_no_discriminators": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.ship_discriminators=false"]),
    "relay_first_site_warmup": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.gan_first_site_warmup_steps=480"]),
    "relay_two_stages": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.num_stages=2"]),
    "relay_quality": ("demo/relay_quality", []),
    "relay_quality_replay_only": ("demo/relay_quality", ["strategy.kwargs.distil_weight=0"]),
    "relay_quality_steps120": ("demo/relay_quality", ["train.num_steps=120", "strategy.kwargs.gan_steps_per_solver_step=8"]),
    "relay_quality_append": ("demo/relay_quality", ["strategy.kwargs.solver_replay=append"]),
    "relay_quality_warmup": ("demo/relay_quality", ["strategy.kwargs.gan_warmup_steps=320"]),
    "relay_ema": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.generator_ema_steps=30"]),
    "relay_quality_long": ("demo/relay_quality", ["train.num_steps=120"]),
    "relay_quality_long_ema": ("demo/relay_quality", ["train.num_steps=120", "strategy.kwargs.generator_ema_steps=100"]),
    "relay_quality_long_preset": ("demo/relay_quality_long", []),
    "relay_quality_long_replay_only": ("demo/relay_quality_long", ["strategy.kwargs.distil_weight=0"]),
    "relay_ema_gan6": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.generator_ema_steps=30", "strategy.kwargs.gan_steps_per_solver_step=6"]),
    "relay_gan8": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.gan_steps_per_solver_step=8"]),
    "relay_gan_lr1": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.g_lr=0.001", "strategy.kwargs.d_lr=0.001"]),
    "relay_snapshots": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.generator_snapshots=5"]),
    "relay_ema_snapshots": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.generator_snapshots=5", "strategy.kwargs.generator_ema_steps=30"]),
    "relay_distil2": ("demo/relay", [*PREVIOUS_DEMO, "strategy.kwargs.distil_weight=2"]),
    "sequential": ("demo/sequential", []),
    "joint": ("demo/joint", []),
}


def _replay_of(run_root: Path) -> dict | None:
    found = sorted(p for p in run_root.rglob("replay.json") if p.parent.name == "metrics")
    return json.loads(found[0].read_text()) if found else None


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(root: Path, name: str, variants: list[str]) -> dict:
    """Per variant: the finished runs' metrics, means ± std, per-site final fidelity ratios."""
    out: dict = {}
    for variant in variants:
        mfile = root.parent / f"{name}-{variant}" / "matrices.json"
        if not mfile.is_file():
            continue
        base = mfile.parent
        finished = [
            (base / label / key, r)
            for label, label_runs in json.loads(mfile.read_text()).items()
            for key, r in label_runs.items()
            if r.get("matrix") and "acc" in r["matrix"]
        ]
        if not finished:
            continue
        runs = [r for _, r in finished]
        replays = [_replay_of(run_root) for run_root, _ in finished]
        row = {"runs": len(runs)}
        for metric in ("acc", "bwt", "forgetting"):
            row[metric] = _stats([r["matrix"].get(metric) for r in runs])
        row["external_dice"] = _stats([external_dice(r["matrix"]) for r in runs])
        row["fidelity"] = _stats([mean_final_fidelity(rp) if rp else None for rp in replays])
        row["fidelity_ratio"] = _stats([mean_final_fidelity(rp, relative=True) if rp else None for rp in replays])
        ratios: dict[str, list[float]] = {}
        for rp in replays:
            for site, ratio in (final_fidelity(rp, relative=True) if rp else {}).items():
                ratios.setdefault(site, []).append(ratio)
        row["final_fidelity_ratio_per_site"] = {s: statistics.mean(v) for s, v in ratios.items()}
        row["wall_s"] = _stats([r["wall_seconds"] for r in runs])
        out[variant] = row
    return out


def targets(summary: dict) -> dict:
    t: dict = {}
    seq, joint = summary.get("sequential"), summary.get("joint")
    only, relay = summary.get("relay_replay_only"), summary.get("relay")
    if only and seq and seq["forgetting"][0]:
        per_site = only["final_fidelity_ratio_per_site"]
        t["replay_only_fidelity_ge_0.8x_every_site"] = bool(per_site) and min(per_site.values()) >= 0.8
        t["replay_only_min_fidelity_ratio"] = min(per_site.values()) if per_site else None
        t["replay_only_forgetting_over_sequential"] = only["forgetting"][0] / seq["forgetting"][0]
        t["replay_only_forgetting_le_third_of_sequential"] = only["forgetting"][0] <= seq["forgetting"][0] / 3
    if relay and joint:
        t["relay_acc_minus_joint_acc"] = relay["acc"][0] - joint["acc"][0]
        t["relay_acc_ge_joint_minus_0.05"] = relay["acc"][0] >= joint["acc"][0] - 0.05
    if relay:
        t["relay_forgetting_le_0.05"] = relay["forgetting"][0] <= 0.05
    return t


def _fmt(pair, digits: int = 3, signed: bool = False) -> str:
    mean, std = pair
    if mean is None:
        return "–"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def markdown(summary: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| variant | runs | ACC | BWT | forgetting | external Dice | final replay fidelity | × reference | min over sites of × reference | wall time / run (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, r in summary.items():
        per_site = r["final_fidelity_ratio_per_site"]
        lowest = min(per_site, key=per_site.get) if per_site else None
        lowest_text = f"{per_site[lowest]:.2f} ({lowest})" if lowest else "–"
        lines.append(
            f"| {variant} | {r['runs']} | {_fmt(r['acc'])} | {_fmt(r['bwt'], signed=True)} | {_fmt(r['forgetting'])} | "
            f"{_fmt(r['external_dice'])} | {_fmt(r['fidelity'])} | {_fmt(r['fidelity_ratio'], 2)} | {lowest_text} | {_fmt(r['wall_s'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="replay_ablation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="batches per site (joint gets 4x, pooled); default: the configs'")
    p.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    p.add_argument("--data-root", default="data/synth")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra override for every variant")
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from the runs finished so far")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    variants = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"--only: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    root = Path("exps") / "compare" / args.name
    started = time.time()
    for seeds in range(1, 0 if args.table_only else args.seeds + 1):
        for variant in variants:
            config, extra = VARIANTS[variant]
            overrides = list(args.sets) + extra
            if args.steps:
                overrides.append(f"train.num_steps={args.steps * 4 if variant == 'joint' else args.steps}")
            compare_strategies([config], f"{args.name}-{variant}", orders=1, seeds=seeds, data_root=args.data_root, overrides=overrides, quiet=args.quiet)
            summary = summarise(root, args.name, variants)
            header = (
                f"# {args.name}: {args.seeds} seed(s) planned, mean ± std over finished runs "
                f"(steps per site: {args.steps or 'config'}; elapsed {time.time() - started:.0f} s)"
            )
            atomic_write(root / "ablation.md", markdown(summary, header))
            atomic_write(
                root / "ablation.json", json.dumps({"summary": summary, "targets": targets(summary), "seeds": args.seeds, "steps": args.steps}, indent=2)
            )
    if args.table_only:
        summary = summarise(root, args.name, variants)
        atomic_write(root / "ablation.md", markdown(summary, f"# {args.name}: mean ± std over the runs finished so far"))
        atomic_write(root / "ablation.json", json.dumps({"summary": summary, "targets": targets(summary), "seeds": args.seeds, "steps": args.steps}, indent=2))
    print((root / "ablation.md").read_text())
    print(json.dumps(targets(summarise(root, args.name, variants))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
