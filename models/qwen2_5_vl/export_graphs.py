"""Trace the Qwen2.5-VL wrappers to ONNX with either torch exporter, all shapes dynamic.

dynamo (torch.export, `dynamic_shapes`) is the default; the TorchScript exporter
(`dynamic_axes`) is ~20x faster to trace and gives a noisier graph (Shape/Gather chains that
fold-constants and cse clean up). Both are traced at shapes chosen to avoid the known traps
(EXPORT-NOTES.md: S=1 pins the axis / hits is_causal, P=0 pins the cache). `*_feeds` make the
numerical-check inputs at *other* shapes, so a size baked into a graph shows up as an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmc.models import decoder_export
from mmc.models.decoder_export import export_onnx, make_cached_decoder
from mmc.runtime.vision_glue import vision_indices

VISION_INPUTS = ["pixel_values", "pos_hw", "window_index", "reverse_index", "seg_full", "seg_window"]
TRACE_GRIDS = [[1, 8, 12], [1, 4, 4]]   # two images, one not a multiple of the window
CHECK_GRIDS = [[[1, 12, 18]], [[1, 6, 10], [2, 4, 6]]]


def vision_arrays(meta: dict, grids, rng: np.random.Generator) -> dict[str, np.ndarray]:
    g = np.asarray(grids, dtype=np.int64)
    vi = vision_indices(g, meta["spatial_merge_size"], meta["window_size"], meta["patch_size"])
    width = meta["in_channels"] * meta["temporal_patch_size"] * meta["patch_size"] ** 2
    pixels = rng.standard_normal((int(g.prod(-1).sum()), width)).astype(np.float32)
    return dict(zip(VISION_INPUTS, (pixels, vi.pos_hw, vi.window_index, vi.reverse_index, vi.seg_full,
                                    vi.seg_window)))


def vision_feeds(meta: dict, rng) -> list[dict]:
    return [vision_arrays(meta, g, rng) for g in CHECK_GRIDS]


def export_vision(model, path: Path, exporter: str, meta: dict, opset: int | None = None) -> Path:
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
    return export_onnx(tower, args, path, exporter, VISION_INPUTS, ["image_embeds"], axes, shapes, opset)


def export_decoder(model, path: Path, exporter: str, meta: dict, opset: int | None = None) -> Path:
    wrapper = make_cached_decoder(model.model.language_model, model.lm_head, meta["num_layers"])
    return decoder_export.export_decoder(wrapper, path, exporter, meta, opset)
