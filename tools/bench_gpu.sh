#!/usr/bin/env bash
# The end-to-end benchmark on the GPU machine (device run; carry .whl), in calls of < 10 min that
# share /tmp/mmc-bench while the machine stays warm:
#   bash tools/bench_gpu.sh bf16      checkpoint + bf16 engine, mmc text/image, logits cosine, transformers eager
#   bash tools/bench_gpu.sh int8      int8 engine, mmc text/image, transformers static cache + torch.compile
#   bash tools/bench_gpu.sh ckpt      the dummy checkpoint only  } a 7B needs a call for each:
#   bash tools/bench_gpu.sh build     the MODES engines only      } then bf16 / int8 measure
# PRESET (default qwen2.5-vl-3b), MODES (build: bf16), PEERS (eager / compile), RUNS (10) and
# DEADLINE (seconds, 560) override; JSON/logs in $OUT.
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
WORKDIR=/tmp/mmc-bench
rm -rf /tmp/mmc-export-* "$WORKDIR"/.*.partial-*  # what a compile killed by a time limit left behind
if [ "$1" = ckpt ]; then
  [ -f "$WORKDIR/$PRESET/config.json" ] && exit 0
  exec timeout 590 python3 -c "import sys, time; from mmc.models.qwen2_5_vl.presets import build_checkpoint; t = time.time(); \
build_checkpoint(sys.argv[1], sys.argv[2]); print(f'checkpoint {sys.argv[2]} in {time.time() - t:.0f} s')" "$PRESET" "$WORKDIR/$PRESET"
fi
case "$1" in
  bf16) args=(--modes bf16 --peers "${PEERS:-eager}") ;;
  int8) args=(--modes int8 --peers "${PEERS:-compile}") ;;
  build) args=(--modes "${MODES:-bf16}" --build-only) ;;
  *) echo "usage: bench_gpu.sh ckpt|build|bf16|int8" >&2; exit 2 ;;
esac
timeout 590 python3 tools/bench_cuda.py --preset "$PRESET" --workdir "$WORKDIR" "${args[@]}" --workloads text,image --runs "${RUNS:-10}" \
  --deadline "${DEADLINE:-560}" --json "$OUT/bench-$PRESET-$1.json" > "$OUT/bench-$PRESET-$1.log" 2>&1
rc=$?
grep -v "Loading weights" "$OUT/bench-$PRESET-$1.log" | tail -25
exit $rc
