#!/usr/bin/env bash
# The end-to-end benchmark on the GPU machine (device run; carry .whl), in calls of < 10 min that
# share /tmp/mmc-bench while the machine stays warm:
#   bash tools/bench_gpu.sh bf16      checkpoint + bf16 engine, mmc text/image, logits cosine, transformers eager
#   bash tools/bench_gpu.sh int8      int8 engine, mmc text/image, transformers static cache + torch.compile
# PRESET (default qwen2.5-vl-3b), RUNS (10) and DEADLINE (seconds, 560) override; JSON/logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
python3 -c "import mmc" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
PRESET=${PRESET:-qwen2.5-vl-3b}
case "$1" in
  bf16) args=(--modes bf16 --peers eager) ;;
  int8) args=(--modes int8 --peers compile) ;;
  *) echo "usage: bench_gpu.sh bf16|int8" >&2; exit 2 ;;
esac
timeout 590 python3 tools/bench_cuda.py --preset "$PRESET" "${args[@]}" --workloads text,image --runs "${RUNS:-10}" \
  --deadline "${DEADLINE:-560}" --json "$OUT/bench-$PRESET-$1.json" > "$OUT/bench-$PRESET-$1.log" 2>&1
rc=$?
grep -v "Loading weights" "$OUT/bench-$PRESET-$1.log" | tail -25
exit $rc
