"""Replay smoke run: the relay over two sites within a time budget, then what site 1 kept.

Trains the first two sites of a relay config (default ``fundus/relay``: paper-size GANs, 64 px)
for as many batches per site as fit in ``--seconds`` (from ``--ms-per-iter``, the measured
relay iteration time, with a margin for evaluation and bundles), and prints one JSON line:

    {"name": "replay_smoke", "device", "config", "img_size", "batch", "steps_per_site", "wall_s",
     "dice": {trained site: {test site: Dice}}, "replay_fidelity": ... | null, "replay_fidelity_note"}

``replay_fidelity`` is the run's ``metrics/replay.json`` when this version of relaylearn writes
one (the fidelity of site 1's replay after site 2), else null with a note.

    python benchmarks/replay_smoke.py --data-root data/synth --seconds 240 --ms-per-iter 500
    python benchmarks/replay_smoke.py --config demo/relay --batch 4 --steps 4   # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

#: part of the budget left for start-up, testing after each site and writing bundles
OVERHEAD_SHARE = 0.25


def steps_for(seconds: float, ms_per_iter: float, sites: int = 2) -> int:
    """Batches per site that fit in ``seconds`` for ``sites`` sites (at least 2: one per stage)."""
    return max(2, int(seconds * (1 - OVERHEAD_SHARE) / sites / (ms_per_iter / 1000)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fundus/relay")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-root", required=False, help="dataset root (DoFE layout)")
    p.add_argument("--seconds", type=float, default=240, help="time budget of the two sites")
    p.add_argument("--ms-per-iter", type=float, default=None, help="measured relay iteration time (sets the steps)")
    p.add_argument("--steps", type=int, default=None, help="batches per site (instead of --seconds / --ms-per-iter)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--exps-root", default=None, help="keep the run here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None and args.ms_per_iter is None:
        p.error("give --steps, or --ms-per-iter (with --seconds)")
    steps = args.steps if args.steps is not None else steps_for(args.seconds, args.ms_per_iter)

    from relaylearn.config import load_config
    from relaylearn.engine import quiet_lightning
    from relaylearn.runner import RelayRun, TrainOptions

    sets = list(args.sets) + [f"train.num_steps={steps}", "train.num_epochs=null", "train.num_mimgs=null"]
    if args.batch:
        sets.append(f"train.batch_size={args.batch}")
    cfg = load_config(args.config, sets, data_root=args.data_root)
    cfg.tasks = cfg.tasks[:2]
    task = cfg.tasks[0]
    quiet_lightning()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.exps_root) if args.exps_root else Path(tmp)
        result = RelayRun(cfg, "replay_smoke", TrainOptions(quiet=True, exps_root=root)).run()
        wall = time.perf_counter() - began
        fidelity_path = result.run_dir / "metrics" / "replay.json"
        fidelity = json.loads(fidelity_path.read_text()) if fidelity_path.is_file() else None
    device = f"cuda:{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
    record = {
        "name": "replay_smoke",
        "device": device,
        "config": args.config,
        "sets": args.sets,
        "img_size": list(task.dataset.kwargs.img_size),
        "batch": task.train.batch_size,
        "precision": task.train.precision,
        "steps_per_site": steps,
        "wall_s": round(wall, 1),
        "matrix": result.matrix,
        "replay_fidelity": fidelity,
        "torch": torch.__version__,
    }
    if fidelity is None:
        record["replay_fidelity_note"] = "metrics/replay.json not written by this version of relaylearn"
    print(json.dumps(record, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
