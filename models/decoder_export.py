"""Export a Hugging Face decoder with its KV cache as flat tensors; shared by every family.

    CachedDecoder(inputs_embeds [B,S,H], position_ids [B,S] or [3,B,S] (M-RoPE),
                  attention_mask [B,P+S], past_key_0, past_value_0, ... [B,KV,P,D])
        -> logits [B,S,V], present_key_0, present_value_0, ... [B,KV,P+S,D]

`DynamicCache` cannot cross the export boundary (EXPORT-NOTES.md), so the wrapper rebuilds one
from the flat past tensors. Traced at B=2, S=3, P=4 (S=1 pins the axis / hits sdpa's is_causal
SymBool; P=0 pins the cache); `decoder_feeds` gives numerical-check inputs at other shapes,
including a left-padded row, so a size baked into a graph shows up as an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXPORTERS = ("dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17


@dataclass
class ExportedComponent:
    name: str
    path: Path                      # ONNX file (external data beside it)
    check_feeds: list[dict]         # feed sets for numerical checks at untraced shapes


def decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "position_ids", "attention_mask", *past], ["logits", *present]


def decoder_arrays(meta: dict, b: int, s: int, p: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    names, _ = decoder_io(meta["num_layers"])
    pos = np.broadcast_to(np.arange(p, p + s), (b, s))
    if meta.get("mrope"):
        pos = np.broadcast_to(pos, (3, b, s))
    feeds = {
        "inputs_embeds": rng.standard_normal((b, s, meta["hidden_size"])).astype(np.float32),
        "position_ids": pos.astype(np.int64).copy(),
        "attention_mask": np.ones((b, p + s), dtype=np.int64),
    }
    for n in names[3:]:
        feeds[n] = rng.standard_normal((b, meta["num_kv_heads"], p, meta["head_dim"])).astype(np.float32)
    return feeds


def decoder_feeds(meta: dict, rng) -> list[dict]:
    feeds = [decoder_arrays(meta, 1, 5, 0, rng), decoder_arrays(meta, 3, 1, 6, rng)]
    padded = decoder_arrays(meta, 2, 4, 3, rng)
    padded["attention_mask"][1, :2] = 0  # left padding in row 1
    return feeds + [padded]


def make_cached_decoder(base_model, lm_head, num_layers: int):
    """The export wrapper (a torch Module) around `base_model` (the decoder stack) + `lm_head`."""
    from torch import nn
    from transformers.cache_utils import DynamicCache

    class CachedDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model, self.lm_head, self.num_layers = base_model, lm_head, num_layers

        def forward(self, inputs_embeds, position_ids, attention_mask, *past):
            cache = DynamicCache(config=self.base_model.config)
            for i in range(self.num_layers):
                layer = cache.layers[i]
                layer.lazy_initialization(past[2 * i], past[2 * i + 1])
                layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            out = self.base_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                  attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            logits = self.lm_head(out.last_hidden_state)  # [B, S, V]
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (logits, *present)

    return CachedDecoder().eval()


@contextlib.contextmanager
def quiet():
    """The exporters print pages of warnings and progress for every trace; keep the CLI readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def export_onnx(module, args, path: Path, exporter: str, input_names, output_names, dynamic_axes,
                dynamic_shapes, opset: int | None = None) -> Path:
    """torch.onnx.export with either exporter; `opset` None = the exporter's default."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset or TORCHSCRIPT_OPSET, dynamo=False)
        else:
            extra = {"opset_version": opset} if opset else {}
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_shapes=dynamic_shapes, dynamo=True, external_data=True,
                              optimize=True, verbose=False, **extra)
    return path


def export_decoder(wrapper, path: Path, exporter: str, meta: dict, opset: int | None = None) -> Path:
    import torch

    names, outputs = decoder_io(meta["num_layers"])
    arrays = decoder_arrays(meta, 2, 3, 4, np.random.default_rng(0))
    args = tuple(torch.from_numpy(arrays[k]) for k in names)
    pos_axes = {1: "batch", 2: "seq"} if meta.get("mrope") else {0: "batch", 1: "seq"}
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": pos_axes,
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in names[3:]}
    axes |= {n: {0: "batch", 2: "total"} for n in outputs[1:]}
    b, s, p, t = (torch.export.Dim(x) for x in ("batch", "seq", "past", "total"))
    pos_shape = {1: b, 2: s} if meta.get("mrope") else {0: b, 1: s}
    shapes = ({0: b, 1: s}, pos_shape, {0: b, 1: t}, tuple({0: b, 2: p} for _ in names[3:]))
    return export_onnx(wrapper, args, path, exporter, names, outputs, axes, shapes, opset)


def check_exporter(exporter: str, opset: int | None) -> None:
    from mmc.errors import MmcError

    if exporter not in EXPORTERS:
        raise MmcError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")
    lo, hi = (17, 23) if exporter == "dynamo" else (14, 20)
    if opset is not None and not lo <= opset <= hi:
        raise MmcError(f"opset {opset} is not supported by the {exporter} exporter (choose {lo}..{hi})")
