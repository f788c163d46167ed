"""Trace the Qwen2.5-VL wrappers to ONNX with either torch exporter, all shapes dynamic.

dynamo (torch.export, `dynamic_shapes`) is the default; the TorchScript exporter
(`dynamic_axes`) is ~20x faster to trace and gives a noisier graph (Shape/Gather chains that
fold-constants and cse clean up). Both are traced at shapes chosen to avoid the known traps
(EXPORT-NOTES.md: S=1 pins the axis / hits is_causal, P=0 pins the cache). `*_feeds` make the
numerical-check inputs at *other* shapes, so a size baked into a graph shows up as an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from mmc.runtime.vision_glue import vision_indices

VISION_INPUTS = ["pixel_values", "pos_hw", "window_index", "reverse_index", "seg_full", "seg_window"]
TRACE_GRIDS = [[1, 8, 12], [1, 4, 4]]   # two images, one not a multiple of the window
CHECK_GRIDS = [[[1, 12, 18]], [[1, 6, 10], [2, 4, 6]]]


def decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "position_ids", "attention_mask", *past], ["logits", *present]


def vision_arrays(meta: dict, grids, rng: np.random.Generator) -> dict[str, np.ndarray]:
    g = np.asarray(grids, dtype=np.int64)
    vi = vision_indices(g, meta["spatial_merge_size"], meta["window_size"], meta["patch_size"])
    width = meta["in_channels"] * meta["temporal_patch_size"] * meta["patch_size"] ** 2
    pixels = rng.standard_normal((int(g.prod(-1).sum()), width)).astype(np.float32)
    return dict(zip(VISION_INPUTS, (pixels, vi.pos_hw, vi.window_index, vi.reverse_index, vi.seg_full,
                                    vi.seg_window)))


def decoder_arrays(meta: dict, b: int, s: int, p: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    names, _ = decoder_io(meta["num_layers"])
    feeds = {
        "inputs_embeds": rng.standard_normal((b, s, meta["hidden_size"])).astype(np.float32),
        "position_ids": np.broadcast_to(np.arange(p, p + s), (3, b, s)).astype(np.int64).copy(),
        "attention_mask": np.ones((b, p + s), dtype=np.int64),
    }
    for n in names[3:]:
        feeds[n] = rng.standard_normal((b, meta["num_kv_heads"], p, meta["head_dim"])).astype(np.float32)
    return feeds


def vision_feeds(meta: dict, rng) -> list[dict]:
    return [vision_arrays(meta, g, rng) for g in CHECK_GRIDS]


def decoder_feeds(meta: dict, rng) -> list[dict]:
    feeds = [decoder_arrays(meta, 1, 5, 0, rng), decoder_arrays(meta, 3, 1, 6, rng)]
    padded = decoder_arrays(meta, 2, 4, 3, rng)
    padded["attention_mask"][1, :2] = 0  # left padding in row 1
    return feeds + [padded]


@contextlib.contextmanager
def _quiet():
    """The exporters print pages of warnings and progress for every trace; keep the CLI readable."""
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)


def _export(module, args, path: Path, exporter: str, input_names, output_names, dynamic_axes, dynamic_shapes):
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
        else:
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_shapes=dynamic_shapes, dynamo=True, external_data=True,
                              optimize=True, verbose=False)
    return path


def export_vision(model, path: Path, exporter: str, meta: dict) -> Path:
    import torch

    from .wrappers import VisionTower

    tower = VisionTower(model.model.visual).eval()
    arrays = vision_arrays(meta, TRACE_GRIDS, np.random.default_rng(0))
    args = tuple(torch.from_numpy(arrays[k]) for k in VISION_INPUTS)
    axes = {"pixel_values": {0: "patches"}, "pos_hw": {0: "patches"}, "window_index": {0: "merged"},
            "reverse_index": {0: "merged"}, "seg_full": {0: "patches"}, "seg_window": {0: "patches"},
            "image_embeds": {0: "merged"}}
    n, m = torch.export.Dim("patches"), torch.export.Dim("merged")
    shapes = ({0: n}, {0: n}, {0: m}, {0: m}, {0: n}, {0: n})
    return _export(tower, args, path, exporter, VISION_INPUTS, ["image_embeds"], axes, shapes)


def export_decoder(model, path: Path, exporter: str, meta: dict) -> Path:
    import torch

    from .wrappers import TextDecoder

    decoder = TextDecoder(model).eval()
    names, outputs = decoder_io(meta["num_layers"])
    arrays = decoder_arrays(meta, 2, 3, 4, np.random.default_rng(0))
    args = tuple(torch.from_numpy(arrays[k]) for k in names)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in names[3:]}
    axes |= {n: {0: "batch", 2: "total"} for n in outputs[1:]}
    b, s, p, t = (torch.export.Dim(x) for x in ("batch", "seq", "past", "total"))
    shapes = ({0: b, 1: s}, {1: b, 2: s}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in names[3:]))
    return _export(decoder, args, path, exporter, names, outputs, axes, shapes)
