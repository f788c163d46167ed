"""Runs a plan (compiler/plan.py) with torch on one device: the cuda target's executor, which
also runs on the CPU (the same steps, the plugins' torch reference kernels) so CI tests it.

    run(feeds)                      every step, in order; values dropped after their last reader
    run(feeds, cache=StaticCache)   decode with a static KV cache: each cache attention writes
                                    this step's K/V at `cache.pos` into its preallocated buffer
                                    and attends over the whole buffer (the mask hides the slots
                                    not written yet); present outputs are not produced
Host steps (shape arithmetic) depend on input shapes only: their values, and the device copies
of host values that device steps read, are kept per input-shape bucket, so a later run of the
same bucket — and a CUDA graph capture of it — executes device steps alone.

arena (default on): the first run of a bucket records every activation's size and which values
view which (runtime/cuda/memory_plan.py); later runs hand each step whose kernel can write into
given memory a view of one arena buffer at its planned offset, shared by values whose lifetimes
do not overlap. `memory()` reports each bucket's arena against the sum of its activations.

kernels: "triton" runs the plugins' Triton kernels (plugins/<op>/kernels.py) for mmc ops, the
static-cache decode attention (one decode_attention kernel: RoPE, cache write, split-KV, merge)
and weight-only GEMMs;
"torch" runs their torch references (sdpa for attention on CUDA); "auto" (default) is triton
on CUDA when triton is installed, torch elsewhere. Standard ONNX ops are torch ops (cuBLAS GEMMs).

dtypes: float graph inputs become the engine precision; a device step that mixes engine-precision
and float32 inputs computes in the engine precision (float32 tables are cast, as transformers
casts cos/sin to the activation dtype); Cast to float keeps an activation in the engine precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .memory_plan import lifetimes, plan_offsets
from .onnx_ops import DTYPES, HOST_ARGS, OPS, OUT_OPS

PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # engine precision -> dtype name
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8,
                "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "float64": torch.float64}


@dataclass
class StaticCache:
    """Per cache attention step: K and V buffers [B, KV, max_len, D]; `pos` [1] int64 on the
    device, the slot this decode step writes (the same for every row: batches are left-padded)."""
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]]
    pos: torch.Tensor
    max_len: int


def _attr(v):
    if isinstance(v, dict) and "tensor" in v:
        t = v["tensor"]
        return torch.tensor(t["data"], dtype=TORCH_DTYPES[t["dtype"]]).reshape(t["shape"])
    if isinstance(v, list):
        return [_attr(x) for x in v]
    return v


KERNELS = ("auto", "triton", "torch")


def use_triton(kernels: str, device: torch.device) -> bool:
    from mmc.errors import MmcError

    if kernels not in KERNELS:
        raise MmcError(f"unknown kernels {kernels!r} (one of {', '.join(KERNELS)})")
    if kernels == "torch":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if kernels == "triton":
            raise MmcError("kernels 'triton' needs the triton package (pip install triton)") from None
        return False
    return kernels == "triton" or device.type == "cuda"


class Executor:
    def __init__(self, plan: dict, constants: dict[str, torch.Tensor], device: str | torch.device,
                 kernels: str = "auto", arena: bool = True):
        from mmc.plugins import OPS as MMC_OPS

        self.plan, self.device = plan, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N": tensors report an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = TORCH_DTYPES[PRECISIONS[plan["precision"]]]
        self.triton = use_triton(kernels, self.device)
        self.steps = plan["steps"]
        self.attrs = [{k: _attr(v) for k, v in s["attrs"].items()} for s in self.steps]
        self.kernels = [op_kernel(MMC_OPS[s["op"]], self.triton) if s["domain"] == "mmc" else OPS[s["op"]]
                        for s in self.steps]
        # kernels that write into given memory: the arena's candidates
        self.out_kernels = [(self.kernels[i] if self.triton and MMC_OPS[s["op"]].writes_out
                             or MMC_OPS[s["op"]].torch_writes_out else None)
                            if s["domain"] == "mmc" else OUT_OPS.get(s["op"]) for i, s in enumerate(self.steps)]
        self.use_arena = arena
        self._arena: torch.Tensor | None = None
        self.last_read = {n: i for i, s in enumerate(self.steps) for n in s["inputs"] if n}
        self.constants = {}
        for name, spec in plan["constants"].items():
            t = constants[name]
            self.constants[name] = t.to(self.device) if spec["place"] == "device" else t.cpu()
        self.cache_steps = {c["step"]: c for c in plan.get("caches", [])}
        self.host_names = {n for n, c in plan["constants"].items() if c["place"] == "host"} | {
            o for s in self.steps if s["place"] == "host" for o in s["outputs"] if o}
        self.output_names = [o["name"] for o in plan["outputs"]]
        self._buckets: dict[tuple, dict] = {}
        self.trace = False  # label each device step "op:<domain.op>" for torch.profiler (tools/profile_cuda.py)

    # ---- one run ----------------------------------------------------------------------------
    def run(self, feeds: dict[str, torch.Tensor], cache: StaticCache | None = None,
            outputs: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.constants)
        for spec in self.plan["inputs"]:
            x = feeds[spec["name"]]
            if x.dtype in _WIDE_FLOATS and x.dtype != self.dtype:
                x = x.to(self.dtype)
            env[spec["name"]] = x.to(self.device) if x.device != self.device else x
        key = (cache is not None,) + tuple(tuple(feeds[s["name"]].shape) for s in self.plan["inputs"])
        bucket = self._buckets.get(key)
        fresh = bucket is None
        if fresh:
            bucket = {"host": {}, "uploads": {}}
        else:
            env.update(bucket["host"])
        planned = bucket.get("arena")  # value -> its view of the arena
        casts: dict[str, torch.Tensor] = {}  # float32 value -> its engine-precision copy, made once per run
        events, meta = ([], {}) if fresh and self.use_arena else (None, None)
        for i, (s, attrs) in enumerate(zip(self.steps, self.attrs)):
            if s["place"] == "host":
                if not fresh:
                    continue
                outs = self.kernels[i]([env[n] if n else None for n in s["inputs"]], attrs)
                for n, t in zip(s["outputs"], outs):
                    if n:
                        env[n] = bucket["host"][n] = t
                continue
            host_args = HOST_ARGS.get(s["op"], ()) if not s["domain"] else ()
            ins = [None if not n else env[n] if j in host_args else self._device_input(env, n, bucket)
                   for j, n in enumerate(s["inputs"])]
            out = [planned.get(n) for n in s["outputs"]] if planned else None
            if self.trace:
                with torch.profiler.record_function(f"op:{s['domain'] + '.' if s['domain'] else ''}{s['op']}"):
                    outs = self._step(s, ins, attrs, i, cache, out, casts)
            else:
                outs = self._step(s, ins, attrs, i, cache, out, casts)
            # a device step's results live on the device, even where a kernel built a small host tensor
            outs = [o.to(self.device) if o is not None and o.device != self.device else o for o in outs]
            if events is not None:
                self._record(events, meta, i, s, ins, outs)
            for n, t in zip(s["outputs"], outs):
                if n:
                    env[n] = t
            for n in s["free"]:
                env.pop(n, None)
        if fresh:
            if events is not None:
                self._plan_arena(bucket, events, meta)
            self._buckets[key] = bucket
        wanted = outputs or tuple(n for n in self.output_names if not (cache is not None and n.startswith("present_")))
        return {n: env[n] for n in wanted}

    def _step(self, s, ins, attrs, i, cache, out, casts):
        if i in self.cache_steps and cache is not None:
            return self._static_attention(ins, attrs, cache, i, out)
        return self._device_step(s, ins, attrs, i, out, casts)

    # ---- the activation arena -----------------------------------------------------------------
    def _record(self, events, meta, i, s, ins, outs):
        """What the step's outputs are: a view of one of its inputs, fresh memory its kernel could
        have written into given memory (planned), or neither (left to the allocator)."""
        inputs = {t.untyped_storage().data_ptr(): n for n, t in zip(s["inputs"], ins)
                  if n and isinstance(t, torch.Tensor) and t.numel()}
        for n, t in zip(s["outputs"], outs):
            if not n or t is None or not t.numel():
                continue
            base = inputs.get(t.untyped_storage().data_ptr())
            if base is not None:
                events.append((i, n, 0, base))
            elif self.out_kernels[i] is not None and t.is_contiguous() and t.device == self.device:
                events.append((i, n, t.numel() * t.element_size(), None))
                meta[n] = (tuple(t.shape), t.dtype)

    def _plan_arena(self, bucket, events, meta):
        plan = plan_offsets(lifetimes(events, self.last_read, keep=set(self.output_names)))
        if self._arena is None or self._arena.numel() < plan.arena_bytes:
            # a new, larger arena; buckets planned before keep (and their graphs use) the old one
            self._arena = torch.empty(plan.arena_bytes, dtype=torch.uint8, device=self.device)
        views = {}
        for n, off in plan.offsets.items():
            shape, dtype = meta[n]
            nbytes = math.prod(shape) * dtype.itemsize
            views[n] = self._arena[off:off + nbytes].view(dtype).view(shape)
        bucket["arena"], bucket["memory"] = views, plan

    def memory(self) -> list[dict]:
        """Per planned bucket: arena bytes, the sum of its planned activations' bytes, the most
        bytes live at one step (the lower bound) and how many values the arena holds."""
        return [{"bucket": k, "values": len(b["memory"].offsets), "arena_bytes": b["memory"].arena_bytes,
                 "total_bytes": b["memory"].total_bytes, "peak_live_bytes": b["memory"].peak_live_bytes}
                for k, b in self._buckets.items() if "memory" in b]

    def _device_input(self, env, name, bucket):
        t = env[name]
        if t.device != self.device:  # a host value a device step reads: uploaded once per bucket
            if name not in self.host_names:
                return t.to(self.device)
            up = bucket["uploads"].get(name)
            if up is None:
                up = bucket["uploads"][name] = t.to(self.device)
            return up
        return t

    def _device_step(self, s, ins, attrs, i, out, casts):
        if s["op"] == "Cast" and not s["domain"] and ins[0].is_floating_point() and \
                DTYPES[attrs["to"]] == torch.float32 and ins[0].dtype == self.dtype:
            return [ins[0]]  # float32 in the exported graph means "the model's float dtype"
        floats = [t for t in ins if t is not None and t.is_floating_point()]
        if self.dtype != torch.float32 and any(t.dtype == self.dtype for t in floats) \
                and any(t.dtype == torch.float32 for t in floats) and s["op"] not in _KEEP_FLOAT32:
            ins = [self._narrowed(n, t, casts) for n, t in zip(s["inputs"], ins)]
        if out is not None and any(o is not None for o in out):
            return self.out_kernels[i](ins, attrs, out)
        return self.kernels[i](ins, attrs)

    def _narrowed(self, name, t, casts):
        """A float32 input in the engine precision; the same table (rotary cos/sin) is read by
        every layer, so each value is cast once per run."""
        if t is None or t.dtype != torch.float32:
            return t
        if name not in casts:
            casts[name] = t.to(self.dtype)
        return casts[name]

    def _static_attention(self, ins, attrs, cache: StaticCache, i, out=None):
        from mmc.plugins.attention import torch_dequantize_kv, torch_quantize_kv, with_rotary

        ins = list(ins) + [None] * (10 - len(ins))
        mask, kind = ins[5], attrs.get("kv_cache")
        kbuf, vbuf = cache.buffers[i]
        if self.triton:
            from mmc.plugins.attention.kernels import decode_attention

            y = out[0] if out else None
            if kind:  # the codes are made from the rotated k: rotate and quantize first
                q, k, v = with_rotary(ins, attrs, "triton_kernel")[:3]
                k, v = torch_quantize_kv(k, ins[6], kind), torch_quantize_kv(v, ins[7], kind)
                return [decode_attention(_rows(q), kbuf, vbuf, mask, cache.pos, attrs["scale"], ins[6], ins[7],
                                         k=_rows(k), v=_rows(v), out=[y])]
            q, k, v = ins[:3]
            return [decode_attention(_rows(q), kbuf, vbuf, mask, cache.pos, attrs["scale"], k=_rows(k.to(kbuf.dtype)),
                                     v=_rows(v.to(vbuf.dtype)), cos=ins[8], sin=ins[9],
                                     rotary_dim=attrs.get("rotary_dim", 0), out=[y])]
        q, k, v = with_rotary(ins, attrs, "torch_reference")[:3]
        if kind:
            k, v = torch_quantize_kv(k, ins[6], kind), torch_quantize_kv(v, ins[7], kind)
        kbuf.index_copy_(2, cache.pos, k.to(kbuf.dtype))  # this step's slot, in place
        vbuf.index_copy_(2, cache.pos, v.to(vbuf.dtype))
        kf, vf = kbuf, vbuf
        if kind:
            kf, vf = torch_dequantize_kv(kbuf, ins[6], q.dtype), torch_dequantize_kv(vbuf, ins[7], q.dtype)
        return [attention(q, kf, vf, mask, attrs)]


def op_kernel(op, triton: bool):
    """An mmc op's kernel: its Triton kernel where one applies (writing into `out` where given),
    else the torch path (Attention: the reference's cache handling around the device's attention,
    sdpa on CUDA)."""
    def run(ins, attrs, out=None):
        if triton:
            res = op.triton_kernel(ins, attrs, out) if out is not None else op.triton_kernel(ins, attrs)
            if res is not None:
                return res
        if op.name == "Attention":
            from mmc.plugins.attention import torch_cached_attention, with_rotary

            return torch_cached_attention(with_rotary(ins, attrs, "torch_reference"), attrs, attention)
        return op.torch_reference(ins, attrs, out) if out is not None and op.torch_writes_out \
            else op.torch_reference(ins, attrs)
    return run


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last axis with stride 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


_WIDE_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # not float8 codes
# ops whose float32 inputs must not be narrowed
_KEEP_FLOAT32 = {"DequantizeLinear", "QuantizeLinear", "Attention"}  # Attention: its kv scales; it casts its mask itself


def attention(q, k, v, mask, attrs):
    """The attention kernel for the device: torch's fused sdpa on CUDA, the reference elsewhere."""
    from mmc.plugins.attention import torch_attend

    if q.is_cuda:
        import torch.nn.functional as F

        m = mask
        if m is not None and m.dtype != torch.bool:
            m = m.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=attrs["scale"],
                                           enable_gqa=attrs["num_heads"] != attrs["kv_heads"])
        return torch.nan_to_num(y, nan=0.0) if attrs.get("nan_to_zero", 1) else y
    return torch_attend(q, k, v, mask, attrs)
