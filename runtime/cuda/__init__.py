"""mmc's own engine (target "cuda"): plans from compiler/plan.py run by `executor.Executor` with
torch on a CUDA GPU (or the CPU, with the reference kernels); `engine.CudaEngine` adds the
static KV cache and CUDA-graph decode. See docs/cuda.md."""
