"""The relay's side-by-side settings in real training: on at even batches, off at odd ones.

Trains the first ``--sites`` sites of a relay config (default ``demo/relay``, sites 1 and 2)
through Lightning in this process with one setting on every even batch of a site and off on every
odd one (both schedules draw the same random numbers), and times every ``training_step`` of the
loop. ``--what overlap`` (default): the batch's last G+D step beside the solver step
(``overlap_solver_step``); ``--what pairs``: the image and label-map halves of the other G+D steps
side by side (``gan_pairs_side_by_side``). The two halves of the run share the machine's load, so
their ratio holds where absolute times do not. The first two batches of each site (warm-up,
GAN-only steps) are left out.

    python benchmarks/overlap.py --threads 2                                      # the demo budget
    python benchmarks/overlap.py --threads 2 --set strategy.kwargs.gan_steps_per_solver_step=1
    python benchmarks/overlap.py --threads 2 --what pairs

Prints one JSON line: ``{"config", "what", "sites", "batches", "threads", "overlap_ms",
"in_turn_ms" (medians per batch, with the setting on / off), "speedup" (in_turn / overlap), "n"}``.
The even batches run side by side where the config's setting lets them (``auto``: with exactly
two threads, ``--threads 2``); elsewhere both halves run in turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from relaylearn import engine  # noqa: E402
from relaylearn.strategies.relay import Relay  # noqa: E402

FIRST_TIMED_BATCH = 2


#: --what → the relay's method that decides whether that work runs side by side
DECIDERS = {"overlap": "_overlaps_solver_step", "pairs": "_pairs_side_by_side"}


def alternate(batches_ms: dict[bool, list[float]], what: str = "overlap"):
    """Patch the loop and the relay so even batches run ``what`` side by side and odd ones do not;
    returns the undo."""
    state = {"overlap": False}
    name = DECIDERS[what]
    decides, training_step = getattr(Relay, name), engine.SiteModule.training_step

    def on_even_batches(self, step, device):
        return state["overlap"] and decides(self, step, device)

    def timed(self, batch, batch_idx):
        local = self._local_step()
        state["overlap"] = local % 2 == 0
        began = time.perf_counter()
        out = training_step(self, batch, batch_idx)
        if local >= FIRST_TIMED_BATCH:
            batches_ms[state["overlap"]].append((time.perf_counter() - began) * 1000)
        return out

    setattr(Relay, name, on_even_batches)
    engine.SiteModule.training_step = timed

    def undo() -> None:
        setattr(Relay, name, decides)
        engine.SiteModule.training_step = training_step

    return undo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo/relay")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sites", type=int, default=2, help="train the config's first N sites (default 2)")
    p.add_argument("--batches", type=int, default=30, help="batches per site (train.num_steps; default 30)")
    p.add_argument("--data-root", default=None, help="dataset root (default: the config's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--what", choices=sorted(DECIDERS), default="overlap", help="overlap: the last G+D step beside the solver step; pairs: the two GAN pairs side by side"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from relaylearn.config import load_config
    from relaylearn.runner import TrainOptions, run_training

    cfg = load_config(args.config, [f"train.num_steps={args.batches}", *args.sets], data_root=args.data_root)
    cfg.tasks = cfg.tasks[: args.sites]
    if any(task.strategy.name != "relay" for task in cfg.tasks):
        raise SystemExit(f"overlap.py: {args.config} does not train the relay")
    batches_ms: dict[bool, list[float]] = {True: [], False: []}
    undo = alternate(batches_ms, args.what)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_training(cfg, "overlap", TrainOptions(quiet=True, exps_root=Path(tmp), devices="cpu"))
    finally:
        undo()
    overlap, in_turn = (statistics.median(batches_ms[k]) if batches_ms[k] else float("nan") for k in (True, False))
    record = {
        "config": args.config,
        "what": args.what,
        "sets": args.sets,
        "sites": len(cfg.tasks),
        "batches": args.batches,
        "threads": torch.get_num_threads(),
        "overlap_ms": round(overlap, 1),
        "in_turn_ms": round(in_turn, 1),
        "speedup": round(in_turn / overlap, 3),
        "n": [len(batches_ms[True]), len(batches_ms[False])],
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
