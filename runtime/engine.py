"""Load an mmc engine and generate: vision once, prefill once, then one token per decode step.

    prompt + images --processing--> input_ids, pixel_values, grid_thw
        vision graph(pixels, indices)            -> image_embeds [N/4, H]
        embed(input_ids), image rows <- image_embeds  -> inputs_embeds [B, S, H]
        mrope_positions                          -> position_ids [3, B, S], rope delta
        decoder(prefill: S tokens, empty cache)  -> logits, present K/V
        loop: decoder(1 token per sequence, K/V fed back, position = last + 1) -> next token

The K/V cache stays where the execution provider keeps it (ORT IO binding: on the GPU with the
CUDA EP); only logits come back to the host for sampling. Batches are left-padded. The cache is
in the type the decoder's inputs declare in the manifest: float32, or int8 / float8_e4m3fn codes
(`mmc compile --kv-cache`), which only ever exist as OrtValues (numpy has no float8).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmc.errors import MmcError, first_line

from . import engine_format as fmt
from .batching import prepare_batch
from .processing import Processor
from .sampling import SamplingParams, select
from .vision_glue import vision_feeds


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str


@dataclass
class StreamChunk:
    token_id: int | None  # None: a final chunk flushing text the last token left incomplete
    text: str  # the new text this token completes (may be empty mid-character)


class Component:
    """One graph of the engine in an ONNX Runtime session, run through IO binding."""

    def __init__(self, root: Path, name: str, spec: dict, providers: list[str]):
        import onnx
        import onnxruntime as ort

        self.name = name
        path = fmt.inside(root, spec["graph"])
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise fmt.EngineError(f"engine {root} is corrupt: {spec['graph']} is not a valid ONNX file ({type(e).__name__})") from e
        for init in proto.graph.initializer:  # external data must stay inside the engine
            for kv in init.external_data:
                if kv.key == "location":
                    fmt.inside(path.parent, kv.value)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        for key, value in spec.get("session_config", {}).items():  # e.g. fp8 QDQ: session.disable_quant_qdq
            if not (isinstance(key, str) and key.startswith("session.") and isinstance(value, str)):
                raise fmt.EngineError(f"engine {root}: component {name!r} has a bad session_config entry {key!r}")
            opts.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:
            raise fmt.EngineError(f"engine {root}: component {name!r} does not load in ONNX Runtime: "
                                  f"{first_line(e)}") from e
        want = [i["name"] for i in spec["inputs"]]
        have = [i.name for i in self.session.get_inputs()]
        if want != have:
            raise fmt.EngineError(f"engine {root}: component {name!r} graph inputs {have} do not match the manifest {want}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, host_inputs: dict[str, np.ndarray], device_inputs: dict | None = None,
            host_outputs: tuple[str, ...] = ()) -> dict:
        """Run once. `device_inputs` are OrtValues (e.g. last step's K/V); outputs named in
        `host_outputs` come back as numpy, the rest stay OrtValues on the device."""
        binding = self.session.io_binding()
        for k, v in host_inputs.items():
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
            else:  # an OrtValue (a float8 empty cache)
                binding.bind_ortvalue_input(k, v)
        for k, v in (device_inputs or {}).items():
            binding.bind_ortvalue_input(k, v)
        for k in self.output_names:
            binding.bind_output(k, "cpu" if k in host_outputs else self.device)
        self.session.run_with_iobinding(binding)
        outs = dict(zip(self.output_names, binding.get_outputs()))
        return {k: (v.numpy() if k in host_outputs else v) for k, v in outs.items()}


CACHE_TYPES = ("float32", "float16", "int8", "float8_e4m3fn")


def _empty(shape: tuple, dtype: str):
    """An empty cache tensor: numpy where numpy has the type, else an OrtValue of it."""
    if dtype != "float8_e4m3fn":
        return np.zeros(shape, dtype=dtype)
    import onnx
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.zeros(shape, np.uint8), onnx.TensorProto.FLOAT8E4M3FN)


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise MmcError("device 'cuda' needs onnxruntime-gpu (pip install 'mmc[gpu]'); only CPU is available")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    raise MmcError(f"unknown device {device!r} (auto, cpu, cuda)")


class BaseEngine:
    """What every target shares: the manifest, host weights (token embeddings), the processor
    and the generation loop. A target supplies encode_images, prefill and decode_one_token."""

    target = ""

    def __init__(self, path: str | Path, verify: bool = True):
        self.root = Path(path)
        self.manifest = fmt.read_manifest(self.root, verify_hashes=verify)
        if self.manifest["target"] != self.target:
            raise MmcError(f"engine {self.root} is for target {self.manifest['target']!r}; "
                           f"this runtime runs {self.target!r}")
        self.host = self.manifest["host"]
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            self.embed_tokens = load_file(str(fmt.inside(self.root, self.manifest["host_weights"])))["embed_tokens"]
        except (SafetensorError, KeyError, OSError) as e:
            raise fmt.EngineError(f"engine {self.root} is corrupt: host weights unreadable ({e})") from e
        self.mrope = self.host.get("mrope", True)  # engines of format 1 before text-only LMs were M-RoPE
        comps = self.manifest["components"]
        for needed in ("vision", "decoder") if self.host.get("image_token_id") is not None else ("decoder",):
            if needed not in comps:
                raise fmt.EngineError(f"engine {self.root} lacks the {needed!r} component")
        self.processor = Processor(fmt.inside(self.root, self.manifest["assets"]), self.host)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embed_tokens[ids]  # [..., H]

    # ---- generation ---------------------------------------------------------------------
    def _prepare_batch(self, prompts: list[str], images: list[list]):
        return prepare_batch(self.processor, self.host, self.embed, self.encode_images, prompts, images, self.mrope)

    def _steps(self, prompts, images, max_new_tokens, params: SamplingParams, seed) -> Iterator[np.ndarray]:
        """Yield the next token ids [B] per step (finished sequences repeat the pad id)."""
        if params.do_sample:
            params.validate()
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise MmcError(f"seed must be a non-negative integer (got {seed!r})")
        if max_new_tokens < 1:
            raise MmcError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        rng = np.random.default_rng(seed)
        _, embeds, positions, mask, next_pos = self._prepare_batch(prompts, images)
        eos = set(self.host.get("eos_token_ids") or [])
        pad = self.host.get("pad_token_id") or 0
        logits, cache = self._prefill_logits(embeds, positions, mask)
        done = np.zeros(len(prompts), dtype=bool)
        for step in range(max_new_tokens):
            tokens = np.where(done, pad, self.select_tokens(logits, params, rng))
            yield tokens
            done |= np.isin(tokens, list(eos))
            if done.all() or step == max_new_tokens - 1:
                return
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            pos = np.broadcast_to(next_pos[:, None], (len(prompts), 1))
            pos = np.broadcast_to(pos, (3, *pos.shape)).copy() if self.mrope else pos.copy()
            logits, cache = self._decode_logits(tokens, pos, mask, cache)
            next_pos += 1

    # A target may keep logits on its device between these three (the cuda engine samples there).
    def _prefill_logits(self, embeds, positions, mask):
        return self.prefill(embeds, positions, mask)

    def _decode_logits(self, tokens, positions, mask, cache):
        return self.decode_one_token(tokens, positions, mask, cache)

    def select_tokens(self, logits, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
        return select(logits, params, rng)

    def generate(self, prompt: str | list[str], images=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stream: bool = False):
        """Generate from one prompt (or a list, batched) with optional images.

        images: for one prompt a list of paths/PIL images/arrays; for a list of prompts a list of
        such lists. Returns GenerationResult (or a list of them); with stream=True (one prompt)
        an iterator of StreamChunk.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if images is None:
            images = [[] for _ in prompts]
        elif single:
            images = [[images]] if isinstance(images, str | Path) else [list(images)]
        if len(images) != len(prompts):
            raise MmcError(f"{len(prompts)} prompts but {len(images)} image lists")
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        steps = self._steps(prompts, images, max_new_tokens, params, seed)
        if stream:
            if not single:
                raise MmcError("stream=True takes a single prompt")
            return self._stream(steps)
        eos = set(self.host.get("eos_token_ids") or [])
        seqs: list[list[int]] = [[] for _ in prompts]
        for tokens in steps:
            for i, t in enumerate(tokens.tolist()):
                if not seqs[i] or seqs[i][-1] not in eos:
                    seqs[i].append(t)
        results = [GenerationResult(s, self.processor.decode(s)) for s in seqs]
        return results[0] if single else results

    def _stream(self, steps) -> Iterator[StreamChunk]:
        """Text deltas per token, yielded as each token arrives; a token ending mid-character
        waits for the next one, and a final chunk (token_id None) flushes any remainder, so the
        chunks always join to the decoded text."""
        ids: list[int] = []
        emitted = ""
        for tokens in steps:
            ids.append(int(tokens[0]))
            stable = self.processor.decode(ids).rstrip("\ufffd")  # incomplete UTF-8 decodes as U+FFFD
            delta = stable[len(emitted):] if stable.startswith(emitted) else ""
            emitted += delta
            yield StreamChunk(ids[-1], delta)
        full = self.processor.decode(ids)
        if full != emitted:
            yield StreamChunk(None, full[len(emitted):] if full.startswith(emitted) else full)



class Engine(BaseEngine):
    """An ONNX Runtime engine (target "ort")."""

    target = "ort"

    def __init__(self, path: str | Path, device: str = "auto", verify: bool = True):
        super().__init__(path, verify)
        providers = _providers(device)
        comps = self.manifest["components"]
        self.vision = Component(self.root, "vision", comps["vision"], providers) if "vision" in comps else None
        self.decoder = Component(self.root, "decoder", comps["decoder"], providers)
        self.kv_types = {i["name"]: i.get("dtype", "float32") for i in comps["decoder"]["inputs"]
                         if i["name"].startswith("past_")}
        self.kv_names = list(self.kv_types)
        for name, dtype in self.kv_types.items():
            if dtype not in CACHE_TYPES:
                raise fmt.EngineError(f"engine {self.root}: cache input {name} has type {dtype!r}; "
                                      f"this runtime keeps caches of {', '.join(CACHE_TYPES)}")

    # ---- model steps --------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise MmcError(f"engine {self.root} is a text-only model; it cannot take images")
        feeds = vision_feeds(pixel_values, grid_thw, self.host)
        return self.vision.run(feeds, host_outputs=("image_embeds",))["image_embeds"]  # [N/4, H]

    def empty_cache(self, batch: int) -> dict:
        h = self.host
        shape = (batch, h["num_kv_heads"], 0, h["head_dim"])
        return {n: _empty(shape, self.kv_types[n]) for n in self.kv_names}

    def prefill(self, embeds, positions, mask):
        # embeds [B, S, H]; positions [3, B, S] (M-RoPE) or [B, S]; mask [B, S] -> logits of the last position [B, V], K/V
        out = self.decoder.run({"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask,
                                **self.empty_cache(embeds.shape[0])}, host_outputs=("logits",))
        return out["logits"][:, -1], self._present_as_past(out)

    def decode_one_token(self, token_ids, positions, mask, cache):
        # token_ids [B]; positions [3, B, 1] (M-RoPE) or [B, 1]; mask [B, P+1]; cache: K/V of P positions
        embeds = self.embed(token_ids)[:, None, :]  # [B, 1, H]
        out = self.decoder.run({"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask},
                               device_inputs=cache, host_outputs=("logits",))
        return out["logits"][:, -1], self._present_as_past(out)

    @staticmethod
    def _present_as_past(out: dict) -> dict:
        return {k.replace("present_", "past_", 1): v for k, v in out.items() if k.startswith("present_")}

def load(path: str | Path, device: str = "auto", verify: bool = True, **options) -> BaseEngine:
    """Load an engine folder written by `mmc compile`, for the target its manifest names
    ("ort": ONNX Runtime; "cuda": mmc's own engine; options such as max_seq_len go to it;
    "tensorrt": checked against the TensorRT and GPU here, see runtime/tensorrt/engine.py)."""
    target = fmt.read_manifest(Path(path), verify_hashes=False).get("target")
    if target == "cuda":
        from .cuda.engine import CudaEngine

        return CudaEngine(path, device=device, verify=verify, **options)
    if target == "tensorrt":
        from .tensorrt.engine import TensorRTEngine

        return TensorRTEngine(path, device=device, verify=verify, **options)
    if options:
        raise MmcError(f"options {sorted(options)} apply to cuda engines only")
    return Engine(path, device=device, verify=verify)
