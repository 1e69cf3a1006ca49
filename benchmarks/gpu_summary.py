"""Markdown summary of a ``gpu_check.sh`` results file (JSON lines from speed.py and replay_smoke.py).

python benchmarks/gpu_summary.py benchmarks/results/gpu_check_<time>.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SWITCHES = ("precision", "channels_last", "compile", "fused_adam", "replay_per_substep", "aug_device")


def variant(record: dict) -> str:
    on = [record["precision"]] if record.get("precision", "fp32") != "fp32" else []
    on += [k for k in ("channels_last", "compile", "fused_adam", "replay_per_substep", "cudnn_benchmark") if record.get(k)]
    if record.get("aug_device", "none") != "none":
        on.append(f"aug_{record['aug_device']}")
    return "+".join(on) or "fp32"


def summarize(lines: list[str]) -> str:
    records = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    speed = [r for r in records if r.get("name") in ("relay_site1", "relay_replay", "sequential")]
    out = []
    if speed:
        device = next((r["device"] for r in speed if "device" in r), "?")
        first = speed[0]
        out.append(f"device: {device}; config {first.get('config')}, batch {first.get('batch')}, {first.get('img_size')} px, torch {first.get('torch')}")
        out.append("")
        out.append("| measurement | variant | ms/iter | plain / regularised iterations (median ms) | peak memory GiB | TFLOP/s |")
        out.append("| --- | --- | ---: | --- | ---: | ---: |")
        for r in speed:
            if "error" in r:
                out.append(f"| `{r['name']}` | {variant(r)} | error: {r['error'][:80]} | | | |")
                continue
            tflops = f"{r['tflops']:.2f}" if r.get("tflops") is not None else "–"
            kinds = r.get("ms_by_iteration_kind") or {}
            split = ", ".join(f"{k} {v['median_ms']:.1f} (×{v['n']})" for k, v in kinds.items()) or "–"
            out.append(f"| `{r['name']}` | {variant(r)} | {r['ms_per_iter']:.1f} | {split} | {r['peak_mem_bytes'] / 2**30:.2f} | {tflops} |")
    for r in records:
        if r.get("name") == "compile" and "error" in r:
            out.append(f"\ncompile: {r['error']}")
        if r.get("name") == "scaling":
            out.append("")
            if "error" in r:
                out.append(f"scaling: {r['error']}")
                continue
            out.append(f"scaling (batch {r['batch']}, {r['img_size']} px, earlier sites -> ms/iter, peak GiB):")
            for k, ms in r["iter_ms"].items():
                out.append(f"  {k:>3}: {ms:.1f} ms, {r['peak_mem_bytes'][k] / 2**30:.2f} GiB, bundle {r['bundle_bytes'][k]:,} bytes")
            out.append(f"  ratios {json.dumps(r['ratio'])} -> {'flat' if r['flat'] else 'NOT flat'}")
        if r.get("name") == "replay_smoke_ms_fallback":
            out.append(f"replay smoke: {r['note']}")
        if r.get("name") == "replay_smoke_exit":
            out.append(f"replay smoke: {r['note']}")
        if r.get("name") == "replay_smoke":
            out.append("")
            if "error" in r:
                out.append(f"replay smoke: {r['error']}")
                continue
            out.append(f"replay smoke: {r['config']}, {r['img_size']} px, batch {r['batch']}, {r['steps_per_site']} batches per site, {r['wall_s']} s")
            matrix = r.get("matrix") or {}
            if "R" in matrix:
                out.append(f"Dice matrix R (rows: after site k; columns: test sites {matrix.get('sites', '')}): {matrix['R']}")
            if r.get("replay_fidelity") is not None:
                out.append(f"replay fidelity: {json.dumps(r['replay_fidelity'])[:600]}")
            else:
                out.append(f"replay fidelity: not measured ({r.get('replay_fidelity_note', 'no metrics/replay.json')})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: gpu_summary.py RESULTS.jsonl", file=sys.stderr)
        return 2
    path = Path(args[0])
    if not path.is_file():
        print(f"gpu_summary.py: {path}: no such file", file=sys.stderr)
        return 2
    print(summarize(path.read_text().splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
