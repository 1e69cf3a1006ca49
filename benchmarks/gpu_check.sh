#!/usr/bin/env bash
# One GPU check, <= 8.5 minutes on one H100 (run from the repository root; the limits below add up to
# about 500 s, so a device call of 560 s holds it):
#   1. speed matrix at the paper config (fundus/relay, 64 px), batch 128: relay_site1, relay_replay,
#      sequential; fp32 / bf16 / bf16 + cuDNN autotuning / bf16 + channels-last + fused Adam /
#      fp32 + cuDNN autotuning (VARIANTS overrides the list), then compile
#      (under its own time limit); ms per iteration, peak memory, achieved TFLOP/s;
#   2. scaling: the replay iteration with 1, 4 and 16 earlier sites registered (fp32, batch 128);
#   3. replay smoke: paper-size GANs at 64 px, two sites for as many batches as fit in
#      SMOKE_SECONDS (default 120 s, from the measured replay iteration), Dice and, if this
#      version writes metrics/replay.json, the replay fidelity of site 1 after site 2.
# Results: benchmarks/results/gpu_check_<UTC time>.jsonl (one JSON line per measurement), a summary
# on stdout.
#
#   benchmarks/gpu_check.sh                # on the GPU machine
#   benchmarks/gpu_check.sh --small        # the same steps at toy size on the CPU (about 2 minutes)
#
# Environment: PYTHON (default python), VARIANTS (speed.py --variants), RESULTS_DIR (default benchmarks/results), DATA_ROOT (synthetic
# data is written to a temporary folder when unset), SMOKE_SECONDS, MATRIX_TIMEOUT, COMPILE_TIMEOUT,
# SCALING_TIMEOUT, SMOKE_TIMEOUT (hard limits in seconds).
set -uo pipefail

SMALL=0
if [ "${1:-}" = "--small" ]; then SMALL=1; elif [ $# -gt 0 ]; then echo "usage: $0 [--small]" >&2; exit 2; fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT_DIR=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS="$OUT_DIR/gpu_check_${STAMP}$([ $SMALL = 1 ] && echo _small).jsonl"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
started=$(date +%s)

if [ $SMALL = 1 ]; then  # SMALL_CONFIG: a relay config (default demo/relay); 2 batches per smoke site
  CONFIG=${SMALL_CONFIG:-demo/relay}
  # a replay stock of 8 pairs: each variant's timing window covers one refill in a few iterations
  # (the default 256 would time 256 iterations per variant, minutes each for bf16 without bf16 kernels)
  SPEED=(--device cpu --config "$CONFIG" --batch 2 --warmup 1 --iters 1 --threads 1 --flop-iters 1 --set strategy.kwargs.replay_stock=8)
  SMOKE=(--config "$CONFIG" --batch 2 --threads 1 --set test.bootstrap=100 --steps "${SMOKE_STEPS:-2}")
  SCALING=(--device cpu --batch 2 --warmup 1 --iters 1 --threads 1 --sites 1,2)
  SMOKE_SECONDS=${SMOKE_SECONDS:-30}; MATRIX_TIMEOUT=${MATRIX_TIMEOUT:-600}; COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-5}; SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-600}
  SCALING_TIMEOUT=${SCALING_TIMEOUT:-300}
  SYNTH_SIZE=32
else
  SPEED=(--config fundus/relay --batch 128 --warmup 3 --iters 10)
  SMOKE=(--config fundus/relay)
  SCALING=(--config fundus/relay --batch 128 --warmup 2 --iters 5 --sites 1,4,16)
  SMOKE_SECONDS=${SMOKE_SECONDS:-120}; MATRIX_TIMEOUT=${MATRIX_TIMEOUT:-200}; COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-45}
  SCALING_TIMEOUT=${SCALING_TIMEOUT:-50}
  SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-$(( SMOKE_SECONDS + 60 ))}
  SYNTH_SIZE=64
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
fi

echo "== 1/4 speed matrix (limit ${MATRIX_TIMEOUT}s)" >&2
timeout "$MATRIX_TIMEOUT" $PY benchmarks/speed.py "${SPEED[@]}" \
  --variants "${VARIANTS:-fp32;bf16;bf16,cudnn_benchmark;bf16,channels_last,fused_adam;fp32,cudnn_benchmark}" >> "$RESULTS"
echo "   exit $? after $(( $(date +%s) - started ))s" >&2

echo "== 2/4 compile (limit ${COMPILE_TIMEOUT}s; compile time is not in ms_per_iter)" >&2
timeout "$COMPILE_TIMEOUT" $PY benchmarks/speed.py "${SPEED[@]}" --only sequential,relay_replay --variants "compile" --flop-iters 0 >> "$RESULTS" \
  || echo '{"name": "compile", "error": "did not finish within '"$COMPILE_TIMEOUT"' s"}' >> "$RESULTS"
echo "   done after $(( $(date +%s) - started ))s" >&2

echo "== 3/4 scaling with 1..16 earlier sites (limit ${SCALING_TIMEOUT}s)" >&2
timeout "$SCALING_TIMEOUT" $PY benchmarks/scaling.py --json "${SCALING[@]}" >> "$RESULTS" \
  || echo '{"name": "scaling", "error": "failed or over '"$SCALING_TIMEOUT"' s"}' >> "$RESULTS"
echo "   done after $(( $(date +%s) - started ))s" >&2

echo "== 4/4 replay smoke (${SMOKE_SECONDS}s of training)" >&2
DATA=${DATA_ROOT:-}
if [ -z "$DATA" ]; then
  DATA="$TMP/synth"
  $PY -m relaylearn data synth "$DATA" --size "$SYNTH_SIZE" >/dev/null || exit 1
fi
# batches that fit: the fastest measured relay_replay variant that the smoke's precision uses (fp32 here)
MS=$($PY - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
ms = [r["ms_per_iter"] for r in rows if r.get("name") == "relay_replay" and r.get("precision") == "fp32" and "ms_per_iter" in r and not r.get("compile")]
if ms:
    print(min(ms))
else:  # no fp32 relay_replay timing (the matrix failed or timed out): a guess, and the results say so
    note = "no fp32 relay_replay timing in the matrix: the smoke's batches per site were sized from an assumed 1000 ms per iteration"
    with open(sys.argv[1], "a") as results:
        results.write(json.dumps({"name": "replay_smoke_ms_fallback", "ms_per_iter": 1000.0, "note": note}) + "\n")
    print(f"   {note}", file=sys.stderr)
    print(1000.0)
EOF
)
timeout "$SMOKE_TIMEOUT" $PY benchmarks/replay_smoke.py "${SMOKE[@]}" --data-root "$DATA" --seconds "$SMOKE_SECONDS" --ms-per-iter "$MS" >> "$RESULTS"
smoke_exit=$?
if [ $smoke_exit -ne 0 ]; then
  # a result line already written (only the smoke itself writes this name) means the measurement
  # finished and only the exit was slow or failed
  if grep -q '"name": "replay_smoke"' "$RESULTS"; then
    echo '{"name": "replay_smoke_exit", "note": "the smoke wrote its result but exited with '"$smoke_exit"' (124: not within '"$SMOKE_TIMEOUT"' s)"}' >> "$RESULTS"
  else
    echo '{"name": "replay_smoke", "error": "failed or over '"$SMOKE_TIMEOUT"' s (exit '"$smoke_exit"'), see stderr"}' >> "$RESULTS"
  fi
fi
echo "   done after $(( $(date +%s) - started ))s" >&2

$PY benchmarks/gpu_summary.py "$RESULTS"
echo "results: $RESULTS ($(( $(date +%s) - started ))s)" >&2
