"""What the plugins' Triton kernels share.

The kernels run on a CUDA GPU, and on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`,
set before triton is imported), which is how CI tests their logic without a GPU. Triton is
imported only when a kernel is used: the CPU runtime and the compiler do not need it.

- `INTERPRET`: true under the interpreter; `dot` works around one of its defects here (triton
  3.6 computes bf16 `tl.dot` wrongly when interpreted; fp32 products of bf16 values are exact),
  and keeps fp32 operands in IEEE fp32 on the GPU (tl.dot's default there is TF32); `to` is
  the cast for a rounding point (float32 -> bf16 / fp16 rounded to nearest even on the bits:
  the interpreter truncates such casts, and on the GPU a `.to(bf16).to(float32)` round trip
  did not round), so a kernel's rounding points give torch's bits on the GPU and under the
  interpreter.
`pdl` / `inputs_ready`: programmatic dependent launch (Hopper and newer): a decode-path kernel
is launched while the kernel before it still runs, loads what no kernel writes (weights) first,
then waits in `inputs_ready` for the kernel before it to finish and lets the next kernel launch.
`output` gives a kernel the memory the executor planned for its result, where it plans one.
`tile_counters` is the zeroed int32 buffer that kernels whose last program to finish does the
final step (split-K fixup, split-KV merge) count in on; `split_sum` is the split-K fixup itself.
(Block sizes come from `mmc.quantization.next_pow2`; the executor decides which kernels run.)
"""

from __future__ import annotations

import contextlib
import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
PDL_MIN_CAPABILITY = 9  # griddepcontrol: sm_90 and newer


def output(out, i: int, shape, dtype, device):
    """A kernel's i-th result buffer: the one the executor gives (a view of its activation arena,
    runtime/cuda/memory_plan.py) or a new tensor."""
    import torch

    if out is not None and i < len(out) and out[i] is not None:
        return out[i].view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


_PDL: dict = {}
# early launch of the next kernel only for grids of at most this many programs per SM (about one
# wave): on the H100 it saved ~1 us per small decode GEMV, and cost 1-3 us on the multi-wave ones
# (gate_up, down) and 38 us on the lm_head GEMV (tools/sweep_gemv.py, docs/benchmarks.md)
PDL_EARLY_PER_SM = 8


_NO_PDL = [0]  # depth of `no_pdl` blocks


@contextlib.contextmanager
def no_pdl():
    """Kernels launched inside launch plainly: for callers whose kernels' constant inputs
    (weights) may be written by the kernel just before (TensorRT's plugin enqueue). The
    executor's weights are written once, at load."""
    _NO_PDL[0] += 1
    try:
        yield
    finally:
        _NO_PDL[0] -= 1


def pdl(device, programs: int = 0) -> dict:
    """The launch arguments of a kernel that calls `inputs_ready`, for a grid of `programs`
    programs on `device` (`launch_mode`); {"PDL": 0} on the CPU, under the interpreter and
    inside `no_pdl`. Every call of the four decode-path kernels (prefill and vision included)
    takes it: what they read before `inputs_ready` must be written before the kernel before them."""
    if device.type != "cuda" or INTERPRET or _NO_PDL[0]:
        return {"PDL": 0}
    if device not in _PDL:
        import torch

        _PDL[device] = early_limit(torch.cuda.get_device_capability(device),
                                   torch.cuda.get_device_properties(device).multi_processor_count,
                                   os.environ.get("MMC_PDL", "1"))
    return launch_mode(_PDL[device], programs)


def early_limit(capability: tuple, sms: int, setting: str = "1") -> int:
    """The most programs a grid may have and still let the next kernel launch early: about one
    wave (PDL_EARLY_PER_SM per SM); 0 where programmatic dependent launch is off (compute
    capability below 9.0, or MMC_PDL=0)."""
    return PDL_EARLY_PER_SM * sms if capability[0] >= PDL_MIN_CAPABILITY and setting != "0" else 0


def launch_mode(limit: int, programs: int) -> dict:
    """{"PDL": 2, launch_pdl} (wait for the kernel before, let the next one launch once every
    program has passed `inputs_ready`) for a grid within `limit`; {"PDL": 1, launch_pdl} (wait;
    the next kernel launches when this one finishes) for a larger one; {"PDL": 0} if limit is 0."""
    if not limit:
        return {"PDL": 0}
    return {"PDL": 2 if programs <= limit else 1, "launch_pdl": True}


@triton.jit
def inputs_ready(PDL: tl.constexpr):
    """Where a kernel launched with `pdl` starts reading what earlier kernels wrote: wait until
    the kernel before it has finished (its writes visible), then (PDL 2) let the next kernel
    launch (it runs up to its own `inputs_ready` meanwhile: loads of weights, nothing an earlier
    kernel writes). Every program must pass here before it reads an activation or writes
    anything, so a kernel finishes only after the one before it, and a kernel launched early
    finds every kernel but its predecessor finished."""
    if PDL >= 1:
        gdc_wait()
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def _round_bits(x, drop: tl.constexpr):
    """float32 x rounded to nearest even at mantissa bit `drop` (16: bf16's 7 bits, 13: fp16's 10),
    as float32: integer arithmetic on the bits, which no compiler pass folds away."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + ((1 << (drop - 1)) - 1) + ((b >> drop) & 1)) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    return b.to(tl.float32, bitcast=True)


@triton.jit
def to(x, dtype: tl.constexpr):
    """x.to(dtype) where x is float32 and dtype bf16 / fp16: a rounding point that holds. A plain
    `.to(bf16).to(float32)` round trip was measured NOT to round on the H100 (triton 3.6: the
    kernels' "transformers rounding points" differed from torch's by an ulp), and the
    interpreter truncates float32 -> bf16. Rounding the bits first makes the final cast exact, on
    the GPU and under the interpreter alike. (fp16: normal range; a value in fp16's subnormal
    range is rounded twice, off by an ulp at worst.)"""
    if x.dtype == tl.float32:
        if dtype == tl.bfloat16:
            return tl.where(x != x, x, _round_bits(x, 16)).to(dtype)  # (the bit arithmetic would turn a NaN to 0)
        if dtype == tl.float16:
            return tl.where(x != x, x, _round_bits(x, 13)).to(dtype)
    return x.to(dtype)


@triton.jit
def dot(a, b):
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:  # fp32 engines: full fp32 products, not TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


# device -> int32 counters, zero between kernels (the last program of each group resets its own).
# One buffer per device, never replaced (CUDA graphs capture its address), shared by every kernel
# that counts: the engine runs its kernels on one stream, one after another; two such kernels in
# flight at once on one device would share counters.
_COUNTERS: dict = {}
COUNTERS = 1 << 16


def tile_counters(device, n: int):
    """The device's counter buffer, checked to hold `n` counters."""
    import torch

    if n > COUNTERS:
        raise ValueError(f"{n} counters for one kernel (at most {COUNTERS})")
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


@triton.jit
def split_sum(acc, part_ptr, counter, split, n_splits, plane, offs, mask):
    """Split-K fixup, in the kernel: store this split's float32 partial `acc` (at part_ptr +
    split * plane + offs), count in on `counter`; the last split of the tile to arrive sums all
    partials in split order (so the result does not depend on arrival order) and resets the
    counter for the next call. Returns (sum, whether this program is that last one)."""
    tl.store(part_ptr + split * plane + offs, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is stored before the count releases them
    last = tl.atomic_add(counter, 1, sem="acq_rel") == n_splits - 1
    total = acc
    if last:
        tl.debug_barrier()
        total = tl.zeros_like(acc)
        sp = 0
        while sp < n_splits:
            total += tl.load(part_ptr + sp * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
            sp += 1
        tl.atomic_xchg(counter, 0)
    return total, last

