#!/usr/bin/env bash
# The cuda target on the GPU machine, in one call (see docs/STATUS.md):
#   device run: bash tools/gpu_check.sh   (carry .whl: onnx-graphsurgeon, which the machine lacks)
# Installs mmc without network, runs the kernel tests (compiled Triton) and the GPU tests, then the
# kernel micro-benchmark (GPU_CHECK_BENCH=0 skips it); logs to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda_gpu.py ${GPU_CHECK_EXTRA:-} 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
[ "${GPU_CHECK_BENCH:-1}" = 1 ] && python3 tools/bench_kernels.py --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.log"
exit "$rc"
