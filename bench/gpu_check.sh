#!/usr/bin/env bash
# The one prepared GPU check of unlearn_fast (issue 10 items 6 and 9): build, GPU tests, the per-shape
# conv path benchmark that writes the dispatch table (fused implicit GEMM vs cuDNN + epilogue vs plain
# cuDNN fwd+dgrad, every ResNet-18 conv shape at 32 and 224 px), WF step + all-class evaluation
# benchmarks (ResNet-18 32/224 px, ViT-S/16 224 px, batch 256), CKA benchmarks, a table of ratios.
# Sized for < 9 minutes on an H100/H200: every part has its own time limit, cut further so the whole
# run ends by GPU_CHECK_TOTAL_S (default 540 s; a part that would get < 20 s is skipped and recorded),
# and the script goes on when a part fails. Results: $OUT (or bench/results) gets gpu_check.json
# (status of each part), conv_paths.json (per-shape conv timings), wf_gpu_check.json / .md (WF numbers +
# ratio table) and logs.tar.gz (one log per part); bench/results/<device>.json gets the numbers and
# kernels/conv_dispatch_table.py the table (commit both; copies of both land in $OUT: 7 files in all).
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh # CPU dry run: no build, Triton interpreter, tiny models
#
# Knobs: UNLEARN_FAST_AUTOTUNE (default 0 here: one config per kernel, no tuning compile time;
# set 1 to autotune, results cached in $TRITON_CACHE_DIR), GPU_CHECK_BENCH_S (WF bench budget, 150 s),
# GPU_CHECK_CONV_S (conv table budget, 110 s), GPU_CHECK_TOTAL_S (whole run, 540 s).
# Part limits: build 150 + GPU tests 90 + conv table 130 + WF bench 180 + CUDA tests 80 + CKA 50 s,
# each cut to what is left of GPU_CHECK_TOTAL_S.
set -u
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
RES=${OUT:-bench/results}
mkdir -p "$RES"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
export PYTHONUNBUFFERED=1
export UNLEARN_FAST_AUTOTUNE=${UNLEARN_FAST_AUTOTUNE:-0}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/unlearn_fast_triton_cache}
T0=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-540}
STATUS="$RES/gpu_check.json"
# logs live outside $RES and are re-packed into one archive after every part: the device tool returns
# at most 8 files from $OUT, so $RES holds only gpu_check.json, logs.tar.gz and the result files
LOGS=$(mktemp -d)
echo "{}" > "$STATUS"

record() {  # record NAME RC SECONDS: merge into gpu_check.json
  "$PY" - "$STATUS" "$1" "$2" "$3" <<'EOF'
import json, sys
path, name, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = json.load(open(path))
data[name] = {"rc": rc, "ok": rc == 0, "seconds": secs, "timed_out": rc in (124, 137)}
json.dump(data, open(path, "w"), indent=1, sort_keys=True)
EOF
}

part() {  # part NAME LIMIT_S CMD...: run with a time limit, log to $RES/NAME.log, never abort the script
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  local left=$(( TOTAL - (t - T0) - 15 ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 20 ]; then
    echo "=== $name: skipped (${left}s left of GPU_CHECK_TOTAL_S=$TOTAL)"
    record "$name" 125 0
    return
  fi
  echo "=== $name (limit ${limit}s, at $(( t - T0 ))s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  record "$name" "$rc" "$dt"
  tar -czf "$RES/logs.tar.gz" -C "$LOGS" . 2>/dev/null || true
  tail -n 25 "$LOGS/$name.log"
  echo "=== $name: rc=$rc in ${dt}s"
}

if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1 GPU_CHECK_BENCH_S=${GPU_CHECK_BENCH_S:-400}  # stops itself before the part limit
  TOTAL=${GPU_CHECK_TOTAL_S:-3600}  # the interpreter is slow; the GPU deadline does not apply
  part build 60 "$PY" -c "import unlearn_fast, unlearn_fast._ext as e; print('dry run: no build; _C loaded:', e.HAS_C)"
  part gpu_tests 300 "$PY" -m pytest -q -x -p no:cacheprovider -m gpu python_tests/test_wf_linear.py \
    python_tests/test_wf_conv.py
  part conv_table 600 "$PY" bench/conv_table.py --models resnet18_32
  part wf_bench 600 "$PY" bench/gpu_check.py --models resnet18_32,vit_s16_224
  part cka_bench 240 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_cka.py
else
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1
  CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  # build for this GPU only (the default list 8.0;8.6;8.9;9.0+PTX would take 4x the nvcc time)
  part build 150 env TORCH_CUDA_ARCH_LIST="$CAP" "$PY" -m pip install -q --no-build-isolation --no-deps \
    --no-index -e .
  if ! "$PY" -c "import unlearn_fast.kernels.wf_conv" 2>/dev/null; then
    part build_no_ext 120 env UNLEARN_FAST_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps \
      --no-index -e .
  fi
  # correctness on the GPU first (the GPU-only tests), then the conv table (its timings decide which
  # path every conv shape takes in the WF benchmark after it), then the rest
  part gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu python_tests/test_wf_linear.py \
    python_tests/test_wf_conv.py
  GPU_CHECK_CONV_S=${GPU_CHECK_CONV_S:-110} part conv_table 130 "$PY" bench/conv_table.py
  GPU_CHECK_BENCH_S=${GPU_CHECK_BENCH_S:-150} part wf_bench 180 "$PY" bench/gpu_check.py
  part cuda_tests 80 "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" python_tests/test_wf_kernels.py \
    python_tests/test_wf_linear.py python_tests/test_wf_conv.py python_tests/test_wf_nn.py \
    python_tests/test_ext_metrics_ops.py
  part cka_bench 50 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_cka.py
  SLUG=$(cd bench && "$PY" -c "from conftest import device_slug; print(device_slug())" 2>/dev/null)
  [ -n "$SLUG" ] && cp "bench/results/$SLUG.json" "$RES/" 2>/dev/null || true
  cp kernels/conv_dispatch_table.py "$RES/" 2>/dev/null || true
fi
record total 0 $(( $(date +%s) - T0 ))
echo "=== status ($(( $(date +%s) - T0 ))s in all)"
cat "$STATUS"
[ -f "$RES/wf_gpu_check.md" ] && cat "$RES/wf_gpu_check.md"
exit 0
