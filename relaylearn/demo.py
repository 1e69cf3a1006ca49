"""``make demo``: every demo preset over the 4 synthetic sites, one after another, then a table.

Usage: ``python -m relaylearn.demo [--name demo] [--only relay,sequential] [--data-root data/synth]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from relaylearn.config import CONFIG_DIR, load_config
from relaylearn.errors import RelayError
from relaylearn.files import atomic_write
from relaylearn.replay_fidelity import final_fidelity
from relaylearn.results import format_matrix, headline
from relaylearn.runner import TrainOptions, run_training

#: presets in the order they run (``--only local`` adds the single-site baseline)
DEMO_STRATEGIES = ["sequential", "joint", "relay"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relaylearn.demo")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--only", default=None, help="comma-separated strategies (default: all demo presets)")
    parser.add_argument("--data-root", default="data/synth")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    wanted = args.only.split(",") if args.only else DEMO_STRATEGIES
    rows = []
    t_all = time.time()
    try:
        for strategy in wanted:
            if not (CONFIG_DIR / "demo" / f"{strategy}.yaml").is_file():
                continue
            print(f"\n=== demo/{strategy} ===", flush=True)
            cfg = load_config(f"demo/{strategy}", data_root=args.data_root)
            result = run_training(cfg, args.name, TrainOptions(resume=True, quiet=args.quiet))
            print(format_matrix(result.matrix))
            h = headline(result.matrix)
            replay_path = result.run_dir / "metrics" / "replay.json"
            per_site = final_fidelity(json.loads(replay_path.read_text()), relative=True) if replay_path.is_file() else {}
            fidelity = sum(per_site.values()) / len(per_site) if per_site else None
            lowest = min(per_site, key=per_site.get) if per_site else None
            rows.append((strategy, h["acc"], h["bwt"], h["forgetting"], h["external_dice"], result.wall_seconds, fidelity, lowest and per_site[lowest], lowest))
    except RelayError as exc:
        print(f"relaylearn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print("\nstrategy      ACC     BWT  forgetting  external  wall(s)  replay fidelity (x reference): mean, lowest site")
    for name, acc, bwt, fgt, ext, wall, fidelity, lowest, lowest_site in rows:
        replay = "" if fidelity is None else f"{fidelity:.2f}, {lowest:.2f} ({lowest_site})"
        print(f"{name:<11} {acc:6.3f} {bwt:+7.3f} {fgt:10.3f} {ext:9.3f} {wall:8.0f}  {replay}")
    print(f"total {time.time() - t_all:.0f} s")
    summary = Path("exps") / "demo" / f"summary_{args.name}.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        summary,
        json.dumps(
            [
                dict(
                    zip(
                        [
                            "strategy",
                            "acc",
                            "bwt",
                            "forgetting",
                            "external_dice",
                            "wall_s",
                            "replay_fidelity_x_reference",
                            "lowest_replay_fidelity_x_reference",
                            "lowest_replay_site",
                        ],
                        r,
                    )
                )
                for r in rows
            ],
            indent=2,
        ),
    )
    try:
        from relaylearn.report import write_report

        print(f"report: {write_report(Path('exps') / 'demo', name=args.name)}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
