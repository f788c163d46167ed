"""mmc's own engine (target "cuda"): plans run by `Executor` on a CUDA GPU — or on the CPU with
the reference kernels, for tests — with a static KV cache, and every step replayed from CUDA graphs.

    load:     plans/<component>.json + weights/<component>.safetensors (engine precision)
    vision:   once per prompt's images; on CUDA a graph per image shape (runtime/cuda/graphs.py)
    prefill:  the decoder with an empty cache. On CUDA the prompt is left-padded to a length
              bucket (`prefill_bucket`: multiples of 64 up to 1024 tokens, of 256 up to 4096; longer
              prompts run eagerly) and replayed from that bucket's graph: a 32-token prefill is ~700
              kernel launches, which eagerly cost more than the GPU work. The pad slots are masked
              out (exact: they get zero attention weight) and stay in the cache, masked; the cache
              has room for them on top of max_seq_len. The present K/V it returns are copied into
              static buffers [B, KV, max_seq_len + room, D] (preallocated per batch)
    decode:   one token per step. The step's inputs live in static device buffers: token ids
              (embedded on the device), positions, the attention mask over all cache slots
              (1 = written and not padding) and the slot to write. The decoder sees a cache of
              all slots but one plus this token, so every shape is fixed; each cache attention
              writes its K/V at the slot in place. On CUDA the step is captured once per batch
              size in a CUDA graph and replayed; only the logits come back.
All graphs of the engine share one memory pool (they never run at once).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mmc.errors import MmcError, first_line

from .. import engine_format as fmt
from ..engine import BaseEngine
from ..sampling import SamplingParams, select
from .executor import TORCH_DTYPES, Executor, StaticCache
from .graphs import GraphedRuns, capture

DEFAULT_MAX_SEQ_LEN = 1024
PREFILL_GRAPH_MAX = 4096  # longer prompts are compute-bound: eager launch overhead is noise there


def prefill_bucket(s: int) -> int:
    """The length a prompt of `s` tokens is left-padded to for its prefill graph."""
    step = 64 if s <= 1024 else 256
    return -(-s // step) * step


def pad_room(max_seq_len: int) -> int:
    """Cache slots beyond max_seq_len for the most padding a prefill bucket adds to a prompt
    (at most max_seq_len - 1 tokens)."""
    return 63 if max_seq_len - 1 <= 1024 else 255


def _device(device: str) -> torch.device:
    if device in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if device == "cuda":
            raise MmcError("device 'cuda' needs a CUDA GPU and a CUDA build of torch; none is available")
        return torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    raise MmcError(f"unknown device {device!r} (auto, cpu, cuda)")


def load_component(root: Path, name: str, spec: dict, device: torch.device, kernels: str = "auto") -> Executor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        plan = json.loads(fmt.inside(root, spec["plan"]).read_text())
        weights = load_file(str(fmt.inside(root, spec["weights"])))
    except (OSError, ValueError, SafetensorError) as e:
        raise fmt.EngineError(f"engine {root} is corrupt: component {name!r} unreadable ({first_line(e)})") from e
    if plan.get("format") != fmt.CUDA_PLAN_FORMAT:
        raise fmt.EngineError(f"engine {root}: plan format {plan.get('format')!r} of {name!r} is not "
                              f"{fmt.CUDA_PLAN_FORMAT} (compiled by another mmc version: compile it again)")
    missing = sorted(set(plan["constants"]) - set(weights))
    if missing:
        raise fmt.EngineError(f"engine {root} is corrupt: {name!r} weights lack {missing[:3]}")
    return Executor(plan, weights, device, kernels)


class CudaEngine(BaseEngine):
    target = "cuda"

    def __init__(self, path: str | Path, device: str = "auto", verify: bool = True,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, cuda_graphs: bool = True, kernels: str = "auto",
                 prefill_buckets: bool | None = None):
        """cuda_graphs: replay vision, prefill and decode from CUDA graphs (on CUDA);
        prefill_buckets: left-pad prompts to their length bucket (default: with CUDA graphs;
        True on the CPU tests the padding)."""
        super().__init__(path, verify)
        self.device = _device(device)
        if max_seq_len < 2:
            raise MmcError(f"max_seq_len must be >= 2 (got {max_seq_len})")
        self.max_seq_len = max_seq_len
        comps = self.manifest["components"]
        self.vision = load_component(self.root, "vision", comps["vision"], self.device, kernels) if "vision" in comps else None
        self.decoder = load_component(self.root, "decoder", comps["decoder"], self.device, kernels)
        self.dtype = self.decoder.dtype
        self.embed_device = torch.from_numpy(self.embed_tokens).to(self.device, self.dtype)  # [V, H]
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.prefill_buckets = self.cuda_graphs if prefill_buckets is None else prefill_buckets
        self.cache_len = max_seq_len + (pad_room(max_seq_len) if self.prefill_buckets else 0)
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # graphs kept: every prefill bucket up to PREFILL_GRAPH_MAX (28), the 8 latest image shapes
        self._graphed = {c: GraphedRuns(ex, self.pool, limit) for c, ex, limit in
                         (("vision", self.vision, 8), ("decoder", self.decoder, 32)) if ex is not None}
        self._decode: dict[int, _DecodeStep] = {}  # batch size -> its static step

    def encode_images(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        from ..vision_glue import vision_feeds

        if self.vision is None:
            raise MmcError(f"engine {self.root} is a text-only model; it cannot take images")
        feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vision_feeds(pixel_values, grid_thw, self.host).items()}
        with torch.inference_mode():
            out = self._run("vision", feeds)["image_embeds"]
        return out.float().cpu().numpy()  # [N/4, H]

    def prefill(self, embeds, positions, mask):
        logits, state = self._prefill_logits(embeds, positions, mask)
        return logits.float().cpu().numpy(), state

    def decode_one_token(self, token_ids, positions, mask, state):
        logits, state = self._decode_logits(token_ids, positions, mask, state)
        return logits.float().cpu().numpy(), state

    def select_tokens(self, logits, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
        """Greedy: argmax on the device. Sampling: the Triton kernel (no vocabulary sort) with
        uniforms from a torch generator seeded by `rng`; the numpy reference without triton."""
        if not params.do_sample:
            return logits.argmax(-1).cpu().numpy()
        if self.decoder.triton:
            from mmc.plugins.sampling.kernels import sample

            gen = torch.Generator(device=logits.device).manual_seed(int(rng.integers(2**62)))
            u = torch.rand(logits.shape, generator=gen, device=logits.device, dtype=torch.float32)
            u.clamp_(min=torch.finfo(torch.float32).tiny)  # log(0) never
            return sample(logits, u, params.temperature, params.top_k, params.top_p).cpu().numpy()
        return select(logits.float().cpu().numpy(), params, rng)

    def _run(self, component: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One run of a component: its CUDA graph for these shapes, or eagerly."""
        if self.cuda_graphs:
            return self._graphed[component](feeds)
        return getattr(self, component).run(feeds)

    def _prefill_logits(self, embeds, positions, mask):
        # embeds [B, S, H]; positions [3, B, S] / [B, S]; mask [B, S] -> last logits [B, V] (device), cache state
        b, s = mask.shape
        if s >= self.max_seq_len:
            raise MmcError(f"the prompt has {s} tokens; this engine was loaded with max_seq_len {self.max_seq_len}")
        graphed = s <= PREFILL_GRAPH_MAX  # (longer prompts run eagerly, unpadded)
        pad = prefill_bucket(s) - s if self.prefill_buckets and graphed else 0
        if pad:  # left padding, masked out
            embeds = np.pad(embeds, ((0, 0), (pad, 0), (0, 0)))
            positions = np.pad(positions, [(0, 0)] * (positions.ndim - 1) + [(pad, 0)])
            mask = np.pad(mask, ((0, 0), (pad, 0)))
        h = self.host
        empty = torch.zeros(b, h["num_kv_heads"], 0, h["head_dim"])
        feeds = {"inputs_embeds": torch.from_numpy(embeds), "position_ids": torch.from_numpy(np.ascontiguousarray(positions)),
                 "attention_mask": torch.from_numpy(mask)}
        feeds |= {c: empty.to(_cache_dtype(self.decoder, c, self.dtype)) for st in self.decoder.cache_steps.values()
                  for c in st["past"]}
        with torch.inference_mode():
            out = self._run("decoder", feeds) if graphed else self.decoder.run(feeds)
            step = self._decode_step(b)
            for i, c in self.decoder.cache_steps.items():
                kbuf, vbuf = step.cache.buffers[i]
                kbuf[:, :, :s + pad].copy_(out[c["present"][0]])
                vbuf[:, :, :s + pad].copy_(out[c["present"][1]])
        return out["logits"][:, -1], {"batch": b, "pad": pad}

    def _decode_logits(self, token_ids, positions, mask, state):
        # token_ids [B]; positions [3, B, 1] / [B, 1]; mask [B, P+1] -> logits [B, V]
        total = mask.shape[1]
        if total > self.max_seq_len:
            raise MmcError(f"the sequence reached {total} tokens; this engine was loaded with max_seq_len "
                           f"{self.max_seq_len} (load(..., max_seq_len=N) for more)")
        step = self._decode_step(state["batch"])
        with torch.inference_mode():
            logits = step(token_ids, positions, mask, state.get("pad", 0))
        return logits, state

    def _decode_step(self, batch: int) -> _DecodeStep:
        if batch not in self._decode:
            self._decode.clear()  # one batch size at a time: the buffers are the memory
            self._decode[batch] = _DecodeStep(self, batch)
        return self._decode[batch]


def _cache_dtype(executor: Executor, name: str, float_dtype: torch.dtype) -> torch.dtype:
    spec = next(i for i in executor.plan["inputs"] if i["name"] == name)
    dtype = TORCH_DTYPES.get(spec["dtype"] or "float32", torch.float32)
    return float_dtype if dtype.is_floating_point and dtype.itemsize >= 2 else dtype


class _DecodeStep:
    """The static buffers of one batch size and the decode step over them (a CUDA graph on CUDA)."""

    def __init__(self, engine: CudaEngine, batch: int):
        self.engine, self.batch = engine, batch
        dev, h, t = engine.device, engine.host, engine.cache_len
        dec = engine.decoder
        buffers = {}
        for i, c in dec.cache_steps.items():
            dtype = _cache_dtype(dec, c["past"][0], engine.dtype)
            shape = (batch, h["num_kv_heads"], t, h["head_dim"])
            buffers[i] = (torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
        self.cache = StaticCache(buffers, torch.zeros(1, dtype=torch.int64, device=dev), t)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
        pos_shape = (3, batch, 1) if engine.mrope else (batch, 1)
        self.positions = torch.zeros(pos_shape, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(batch, t, dtype=torch.int64, device=dev)
        self.past_views = {c["past"][j]: buffers[i][j][:, :, :t - 1] for i, c in dec.cache_steps.items() for j in (0, 1)}
        self.graph = None
        self.logits = None

    def _run(self) -> torch.Tensor:
        e = self.engine
        feeds = {"inputs_embeds": e.embed_device[self.tokens][:, None, :], "position_ids": self.positions,
                 "attention_mask": self.mask, **self.past_views}
        return e.decoder.run(feeds, cache=self.cache, outputs=("logits",))["logits"][:, -1]

    def __call__(self, token_ids, positions, mask, pad: int = 0) -> torch.Tensor:
        """mask [B, total] covers the real tokens; the prefill's `pad` slots precede them."""
        total = mask.shape[1]
        self.tokens.copy_(torch.from_numpy(np.asarray(token_ids, dtype=np.int64)))
        self.positions.copy_(torch.from_numpy(np.ascontiguousarray(positions)).reshape(self.positions.shape))
        self.mask.zero_()
        self.mask[:, pad:pad + total].copy_(torch.from_numpy(mask))
        self.cache.pos.fill_(pad + total - 1)
        if not self.engine.cuda_graphs:
            return self._run()
        if self.graph is None:
            self.graph, self.logits = capture(self._run, self.engine.pool)
        self.graph.replay()
        return self.logits
