#!/bin/bash
# GPU check of the fused nearest-code kernel (run in the repository root, on a machine with CUDA):
# the GPU tests, the timing/memory/parity table of benchmarks/gpu_check.py, then the flag shares
# of the fast mode's passes next to their CPU emulation (bench_pass_bounds.py --gpu). Logs and
# gpu_check.json go to $OUT when set. Exit status: 0 all good, 1 a test or parity check failed,
# 2 no CUDA device. Under 5 minutes on an H100. If onnxruntime-gpu was installed into /tmp/site
# (pip install --target /tmp/site onnxruntime-gpu; it needs CUDA 13), it is picked up from PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
log=${OUT:-/tmp/vqdeploy_gpu_check}
mkdir -p "$log"
py=${PYTHON:-python3}

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA device here; run it on a machine with an NVIDIA GPU." >&2
  exit 2
fi

timeout 150 "$py" -m pytest -q -p no:cacheprovider -rs \
  tests/ops/test_triton_kernels_gpu.py tests/runtime/test_trt_plugin.py 2>&1 | tee "$log/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 150 "$py" benchmarks/gpu_check.py "$@" 2>&1 | tee "$log/gpu_check.log"
bench_rc=${PIPESTATUS[0]}

# Informational: the fast mode's flag shares on this GPU next to the CPU emulation's.
timeout 120 "$py" benchmarks/bench_pass_bounds.py --quick --gpu --data random,digits \
  --chains "before: tf32 > tf32x3 > ieee,after: bf16[3] > tf32[3] > tf32x3 > ieee" 2>&1 | tee "$log/pass_bounds.log"

echo "gpu tests: exit $tests_rc; gpu_check.py: exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
