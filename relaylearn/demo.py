"""``make demo``: every demo preset over the 4 synthetic sites, one after another, then a table.

Usage: ``python -m relaylearn.demo [--name demo] [--only relay,sequential] [--data-root data/synth]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from relaylearn.config import CONFIG_DIR, load_config
from relaylearn.errors import RelayError, resumes_by_rerunning
from relaylearn.files import atomic_write, json_text
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
            with resumes_by_rerunning():
                result = run_training(cfg, args.name, TrainOptions(resume=True, quiet=args.quiet))
            print(format_matrix(result.matrix))
            h = headline(result.matrix)
            replay_path = result.run_dir / "metrics" / "replay.json"
            per_site = final_fidelity(json.loads(replay_path.read_text()), relative=True) if replay_path.is_file() else {}
            lowest = min(per_site, key=per_site.get) if per_site else None
            rows.append(
                {
                    "strategy": strategy,
                    **{k: h[k] for k in ("acc", "bwt", "forgetting", "external_dice")},
                    "wall_s": result.wall_seconds,
                    "replay_fidelity_x_reference": sum(per_site.values()) / len(per_site) if per_site else None,
                    "lowest_replay_fidelity_x_reference": per_site.get(lowest),
                    "lowest_replay_site": lowest,
                }
            )
    except RelayError as exc:
        print(f"relaylearn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print("\nstrategy      ACC     BWT  forgetting  external  wall(s)  replay fidelity (x reference): mean, lowest site")
    for r in rows:
        replay = (
            ""
            if r["lowest_replay_site"] is None
            else f"{r['replay_fidelity_x_reference']:.2f}, {r['lowest_replay_fidelity_x_reference']:.2f} ({r['lowest_replay_site']})"
        )
        bwt, forgetting = (f"{r['bwt']:+7.3f}", f"{r['forgetting']:10.3f}") if math.isfinite(r["bwt"]) else (f"{'n/a':>7}", f"{'n/a':>10}")
        print(f"{r['strategy']:<11} {r['acc']:6.3f} {bwt} {forgetting} {r['external_dice']:9.3f} {r['wall_s']:8.0f}  {replay}")
    print(f"total {time.time() - t_all:.0f} s")
    summary = Path("exps") / "demo" / f"summary_{args.name}.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(summary, json_text(rows))
    try:
        from relaylearn.report import write_report

        print(f"report: {write_report(Path('exps') / 'demo', name=args.name)}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
