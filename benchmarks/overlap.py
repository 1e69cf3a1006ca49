"""The relay's side-by-side settings in real training: on in half the batches, off in the other half.

Trains the first ``--sites`` sites of a relay config (default ``demo/relay``, sites 1 and 2)
through Lightning in this process with one setting on in half the timed batches and off in the
other half (both schedules draw the same random numbers), and times every ``training_step`` of the
loop. The halves are matched on the lazy-regularisation work a batch does (how many of its G+D
steps run R1, the path-length term and an ADA update): among the batches with the same such work
the setting goes on, off, off, on, …, and a batch left without a partner is not counted
(``"unpaired"``). Plain even / odd alternation put R1 and ADA by parity into one half.

``--what overlap`` (default): the batch's last G+D step beside the solver step (``overlap_solver_step``); ``--what pairs``: the image and label-map halves of the other G+D steps
side by side (``gan_pairs_side_by_side``). The two halves of the run share the machine's load, so
their ratio holds where absolute times do not. The first two batches of each site (warm-up,
GAN-only steps) are left out.

    python benchmarks/overlap.py --threads 2                                      # the demo budget
    python benchmarks/overlap.py --threads 2 --set strategy.kwargs.gan_steps_per_solver_step=1
    python benchmarks/overlap.py --threads 2 --what pairs

Prints one JSON line: ``{"config", "what", "sites", "batches", "threads", "overlap_ms",
"in_turn_ms" (medians per batch, with the setting on / off), "speedup" (in_turn / overlap), "n",
"unpaired"}``. The "on" batches run side by side where the config's setting lets them (``auto``:
with exactly two threads, ``--threads 2``); elsewhere both halves run in turn.
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


def regularisation_label(options, first_gan_step: int, n: int) -> tuple[int, int, int]:
    """How many of the G+D steps ``first_gan_step`` … ``first_gan_step + n - 1`` run R1, the path-length
    term (with ``pl_weight`` > 0) and an ADA update: the work that differs between batches."""
    steps = range(first_gan_step + 1, first_gan_step + n + 1)
    r1 = sum(g % options.d_reg_interval == 0 for g in steps)
    pl = sum(g % options.g_reg_interval == 0 for g in steps) if options.pl_weight > 0 else 0
    ada = sum(g % options.ada_interval == 0 for g in steps)
    return r1, pl, ada


def on_in_abba(turn: int) -> bool:
    """The ``turn``-th batch of a label runs the setting on in the order on, off, off, on, …"""
    return turn % 4 in (0, 3)


def balanced(batches: dict[bool, list[tuple[tuple[int, int, int], float]]]) -> dict[bool, list[float]]:
    """The timed batches with as many of each label on as off (the first ones of each; the rest
    have no partner and are dropped), so both halves hold the same R1 / path-length / ADA work."""
    kept: dict[bool, list[float]] = {True: [], False: []}
    for label in {label for half in batches.values() for label, _ in half}:
        times = {on: [ms for lab, ms in batches[on] if lab == label] for on in (True, False)}
        pairs = min(len(times[True]), len(times[False]))
        for on in (True, False):
            kept[on].extend(times[on][:pairs])
    return kept


def alternate(batches: dict[bool, list[tuple[tuple[int, int, int], float]]], what: str = "overlap"):
    """Patch the loop and the relay so that timed batches run ``what`` side by side or not in turn,
    on, off, off, on among the batches with the same regularisation label (R1, path-length and ADA
    steps, :func:`regularisation_label`), and record ``(label, ms)`` per half; returns the undo.

    The label matters: R1 every ``d_reg_interval`` and the ADA update every ``ada_interval`` G+D
    steps fall by the parity of the batch when the setting simply alternates, which put all the
    R1 steps in one half (with one G+D step per batch) and biased the ratio."""
    state = {"overlap": False}
    turns: dict[tuple[int, int, int], int] = {}
    name = DECIDERS[what]
    decides, training_step = getattr(Relay, name), engine.SiteModule.training_step

    def when_on(self, step, device):
        return state["overlap"] and decides(self, step, device)

    def timed(self, batch, batch_idx):
        local = self._local_step()
        relay = self.strategy
        first = relay.gan_step
        label = regularisation_label(relay.options, first, relay.options.gan_steps_per_solver_step)
        if local >= FIRST_TIMED_BATCH:
            turn = turns.get(label, 0)
            turns[label] = turn + 1
            state["overlap"] = on_in_abba(turn)
        else:
            state["overlap"] = local % 2 == 0
        began = time.perf_counter()
        out = training_step(self, batch, batch_idx)
        if local >= FIRST_TIMED_BATCH:
            if regularisation_label(relay.options, first, relay.gan_step - first) != label:
                raise RuntimeError("overlap.py: a timed batch ran other G+D steps than foreseen")
            batches[state["overlap"]].append((label, (time.perf_counter() - began) * 1000))
        return out

    setattr(Relay, name, when_on)
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
    batches: dict[bool, list] = {True: [], False: []}
    undo = alternate(batches, args.what)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_training(cfg, "overlap", TrainOptions(quiet=True, exps_root=Path(tmp), devices="cpu"))
    finally:
        undo()
    batches_ms = balanced(batches)
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
        "unpaired": sum(map(len, batches.values())) - sum(map(len, batches_ms.values())),
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
