"""Where the time of a relay site goes: a real run (Lightning, data, evaluation, bundles) with timers.

Trains the first ``--sites`` sites of a config (default ``demo/relay``, its first two sites: the
second one replays the first after its mid-site switch) in this process, with wall-clock timers
wrapped around the parts of a site. Times are *exclusive*: a part nested in another (the D forward
inside the G step, the replay augmentation inside the replay) is counted once, in the innermost
part. Categories:

* ``G step: forward``      – generators + discriminators forward for the G loss (path-length penalty included)
* ``D step: forward``      – frozen-G fakes + discriminator forward (R1 penalty included)
* ``G/D/solver: backward + Adam`` – ``Strategy.optimize`` per optimizer (backward, NaN guard, step)
* ``solver forward, loss, distillation`` – the rest of the relay's ``training_step``
* ``replay generation``    – the previous site's frozen generators; ``replay mixing`` the rest of ``mix_with_replay``
* ``augmentation``         – every ``SegmentationAugment`` call (real and replayed pairs)
* ``logging``              – ``log_dict`` (TensorBoard scalars) and the replay previews at the site end
* ``checkpointing``        – local resume checkpoints; ``bundle`` – writing the outgoing bundle
* ``evaluation``           – testing the solver on every test site after the site
* ``generator average`` / ``generator snapshots`` – the relay's moving average of the generators
  after each G step, and the copies kept during a site and scored at its end (where present)
* ``replay fidelity``      – scoring every earlier site's replay after the site (single-machine runs)
* ``privacy audit``        – the audit after each hop (``audit.after_each_hop``)
* ``Lightning + data``     – the rest of ``Trainer.fit`` (loop, data loader, hooks, progress bar)
* ``site setup``           – the rest of the site (data loading, building the strategy, the trainer)

    python benchmarks/profile_site.py --threads 2                   # demo relay, sites 1 and 2
    python benchmarks/profile_site.py --json --set train.precision=bf16-mixed

Prints one table per site (ms per batch and share of the site) or, with ``--json``, one JSON line
per site: ``{"site", "batches", "wall_s", "parts": {name: seconds}, "dice": {test site: Dice after the site}}``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# --code-root DIR: profile the relaylearn of another checkout (e.g. before a change)
CODE_ROOT = Path(sys.argv[sys.argv.index("--code-root") + 1]).resolve() if "--code-root" in sys.argv[:-1] else ROOT
if str(CODE_ROOT) not in sys.path[:1]:  # run from a checkout without installing
    sys.path.insert(0, str(CODE_ROOT))


class ExclusiveTimers:
    """Nested wall-clock timers; each part gets its own time minus that of the parts inside it."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.stack: list[list] = []  # [name, start, time of children]

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            label = name(self, args) if callable(name) else name
            self.stack.append([label, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                label, start, inner = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[label] = self.totals.get(label, 0.0) + elapsed - inner
                if self.stack:
                    self.stack[-1][2] += elapsed

        return timed

    def reset(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


OPTIMIZER_NAMES = ("G", "D", "solver")


#: the relay's settings that run parts of a step side by side, in the versions that have them
SIDE_BY_SIDE_SETTINGS = ("overlap_solver_step", "gan_pairs_side_by_side")


def one_part_at_a_time(tasks) -> None:
    """Exclusive timers need the parts of a step one after another: turn off the relay's last G+D
    step beside the solver step (``overlap_solver_step``) and the two GAN pairs side by side
    (``gan_pairs_side_by_side``), where the checkout has them."""
    from relaylearn.strategies.relay import RelayOptions

    for setting in SIDE_BY_SIDE_SETTINGS:
        if setting in RelayOptions.model_fields:
            for task in tasks:
                if task.strategy.name == "relay":
                    task.strategy.kwargs[setting] = False


def install(timers: ExclusiveTimers) -> list[tuple]:
    """Wrap the parts of a site (classes patched in place, for this process only); returns the
    patches for :func:`uninstall`."""
    import lightning as L

    from relaylearn import engine, runner
    from relaylearn.data import augment
    from relaylearn.strategies import base
    from relaylearn.strategies.relay import Relay

    def optimizer_name(t, args):
        strategy, _, optimizer = args[0], args[1], args[2]
        index = next((i for i, o in enumerate(strategy.optimizers) if o is optimizer or getattr(o, "optimizer", None) is optimizer), -1)
        who = OPTIMIZER_NAMES[index] if isinstance(strategy, Relay) and 0 <= index < 3 else "solver"
        return f"{who}: backward + Adam"

    patches = [
        (runner.RelayRun, "_train_site", "site setup"),
        (runner.RelayRun, "_write_bundle", "bundle"),
        (L.Trainer, "fit", "Lightning + data"),
        (engine.SiteModule, "training_step", "Lightning + data"),
        (engine.SiteModule, "log_dict", "logging"),
        (engine.SiteModule, "_log_previews", "logging"),
        (engine.LocalCheckpoint, "save", "checkpointing"),
        (Relay, "training_step", "solver forward, loss, distillation"),
        (Relay, "_generator_loss", "G step: forward"),
        (Relay, "_discriminator_loss", "D step: forward"),
        (Relay, "replay", "replay generation"),
        (Relay, "mix_with_replay", "replay mixing"),
        (base.Strategy, "optimize", optimizer_name),
        (augment.SegmentationAugment, "forward", "augmentation"),
    ]
    optional = [  # parts that only some checkouts have
        (Relay, "_update_generator_ema", "generator average"),
        (Relay, "_take_generator_snapshot", "generator snapshots"),
        (Relay, "_select_generator_snapshot", "generator snapshots"),
        (runner.RelayRun, "_privacy_audit", "privacy audit"),
    ]
    if importlib.util.find_spec("relaylearn.replay_fidelity") is not None:
        from relaylearn import replay_fidelity

        optional.append((replay_fidelity.FidelityRecorder, "record", "replay fidelity"))
    patches += [(owner, attr, name) for owner, attr, name in optional if hasattr(owner, attr)]
    patches.append((engine, "evaluate_site", "evaluation"))
    if hasattr(runner, "evaluate_site"):  # checkouts whose runner imports it by name
        patches.append((runner, "evaluate_site", "evaluation"))
    return patch(timers, patches)


def patch(timers: ExclusiveTimers, patches: list[tuple]) -> list[tuple]:
    """``owner.attr = timers.wrap(name, owner.attr)`` for each (owner, attr, name); returns
    (owner, attr, what the owner itself held) for :func:`uninstall`."""
    undo = []
    for owner, attr, name in patches:
        undo.append((owner, attr, vars(owner).get(attr)))
        setattr(owner, attr, timers.wrap(name, getattr(owner, attr)))
    return undo


def uninstall(undo: list[tuple]) -> None:
    """Undo :func:`install` / :func:`patch` (in reverse order)."""
    for owner, attr, held in reversed(undo):
        if held is None:
            delattr(owner, attr)  # the attribute was inherited
        else:
            setattr(owner, attr, held)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo/relay")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sites", type=int, default=2, help="train the config's first N sites (default 2)")
    p.add_argument("--data-root", default=None, help="dataset root (default: the config's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON line per site instead of the table")
    p.add_argument("--code-root", help="import relaylearn from this checkout (default: this one)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from relaylearn.config import load_config
    from relaylearn.runner import RelayRun, TrainOptions, quiet_lightning  # quiet_lightning: the runner imports it in every checkout

    cfg = load_config(args.config, args.sets, data_root=args.data_root)
    cfg.tasks = cfg.tasks[: args.sites]
    one_part_at_a_time(cfg.tasks)
    timers = ExclusiveTimers()
    install(timers)

    from relaylearn import runner

    per_site: list[dict] = []
    train_site = runner.RelayRun._train_site

    def after_site() -> None:
        """The previous site's bundle is written after its ``_train_site``: count it there."""
        leftover = timers.reset()
        if per_site:
            for name, seconds in leftover.items():
                per_site[-1]["parts"][name] = per_site[-1]["parts"].get(name, 0.0) + seconds
            per_site[-1]["wall_s"] += sum(leftover.values())

    def recorded(self, group, parent, position):
        after_site()
        began = time.perf_counter()
        out = train_site(self, group, parent, position)
        per_site.append({"site": position + 1, "batches": group[0].train.num_steps, "wall_s": time.perf_counter() - began, "parts": timers.reset()})
        return out

    runner.RelayRun._train_site = recorded
    quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        result = RelayRun(cfg, "profile", TrainOptions(quiet=True, exps_root=Path(tmp), devices="cpu")).run()
    after_site()
    rows = result.matrix.get("R", [])
    for rec, row in zip(per_site, rows):
        rec["dice"] = dict(zip(result.matrix.get("sites", []), row))
    for rec in per_site:
        if args.json:
            print(
                json.dumps(
                    {
                        **rec,
                        "code_root": str(CODE_ROOT),
                        "threads": torch.get_num_threads(),
                        "config": args.config,
                        "sets": args.sets,
                        "torch": torch.__version__,
                    }
                )
            )
            continue
        batches = rec["batches"] or 1
        print(
            f"site {rec['site']}: {rec['wall_s']:.1f} s, {batches} batches ({torch.get_num_threads()} threads); Dice after it: "
            + ", ".join(f"{k} {v:.3f}" for k, v in rec.get("dice", {}).items())
        )
        for name, seconds in sorted(rec["parts"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:38s} {seconds * 1000 / batches:8.1f} ms/batch  {100 * seconds / rec['wall_s']:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
