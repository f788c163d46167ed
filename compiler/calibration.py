"""Calibration: prompts (and images) -> the float model's inputs -> activation statistics.

    samples  built-in (text windows of `accuracy.CALIBRATION_TEXT`, plus two generated images
             with prompts for vision-language models) or a JSONL file (`mmc compile --calib PATH`),
             one object per line: {"text": "...", "image": "a.jpg"} ("images": [...] for several;
             both optional, relative paths resolve against the file's folder).
    feeds    per component, the inputs its float graph takes: the decoder gets batch-1 prefills
             built exactly as the runtime builds them (`runtime.batching.prepare_batch`, images
             encoded by the exported float vision graph); the vision graph gets each image.
    stats    `collect(model, feed_sets, tensors, axis)`: per tensor the absmax per channel (`axis`:
             the last one for GEMM inputs, the head axis 1 for K/V),
             the absmax, and a bounded sample of |x| for percentiles. `amax(method)` is what a
             scale is computed from: "minmax" (the absmax) or "percentile" (|x| at `percentile`).

The quantization passes read `ctx.options["calibration"]` (a `Calibration`); the accuracy
report compares float and quantized logits on the same decoder feeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MmcError, first_line

METHODS = ("minmax", "percentile")
MAX_SAMPLES = 1 << 20  # |x| values kept per tensor for percentiles


@dataclass
class Sample:
    text: str
    images: list = field(default_factory=list)  # paths or HxWx3 uint8 arrays


@dataclass
class Calibration:
    source: str                                  # "built-in" or the JSONL path
    feeds: dict[str, list[dict]]                 # component -> feed sets for its float graph
    ids: list[np.ndarray]                        # decoder token ids [B, S] per decoder feed set
    method: str = "minmax"
    percentile: float = 99.99

    def describe(self) -> dict:
        dec = self.feeds.get("decoder", [])
        return {"source": self.source, "method": self.method,
                **({"percentile": self.percentile} if self.method == "percentile" else {}),
                "decoder_prompts": sum(int(i.shape[0]) for i in self.ids),
                "decoder_positions": sum(int(i.size) for i in self.ids), "decoder_feed_sets": len(dec),
                "vision_feed_sets": len(self.feeds.get("vision", []))}


@dataclass
class TensorStats:
    absmax: float
    channel_absmax: np.ndarray      # [C] over the channel axis collect() was given
    samples: np.ndarray             # |x|, at most MAX_SAMPLES values

    def amax(self, method: str = "minmax", percentile: float = 99.99) -> float:
        if method == "percentile" and self.samples.size:
            return float(np.percentile(self.samples, percentile))
        return self.absmax


# ---- samples ------------------------------------------------------------------------------
def synthetic_images(seed: int = 0) -> list[np.ndarray]:
    """Two seeded RGB images (gradients, a few rectangles, noise) of different sizes and aspect."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((112, 168), (140, 112)):
        yy, xx = np.mgrid[0:h, 0:w]
        im = np.stack([255 * xx / w, 255 * yy / h, 128 + 60 * np.sin(xx / 7.0)], -1)
        for _ in range(4):
            y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
            im[y0:y0 + rng.integers(10, 40), x0:x0 + rng.integers(10, 40)] = rng.integers(0, 256, 3)
        out.append(np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8))
    return out


def builtin_samples(vision: bool) -> list[Sample]:
    if not vision:
        return []
    a, b = synthetic_images()
    return [Sample("Describe the image in one sentence.", [a]), Sample("What color is the car?", [b])]


def load_jsonl(path: str | Path) -> list[Sample]:
    """Samples from a JSONL file; any unreadable line, missing text or missing image is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MmcError(f"--calib {path}: no such file")
    samples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MmcError(f"--calib {path}: cannot read ({first_line(e)})") from e
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MmcError(f"--calib {path}:{no}: not JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise MmcError(f"--calib {path}:{no}: each line must be an object with a non-empty \"text\"")
        images = obj.get("images", [obj["image"]] if "image" in obj else [])
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise MmcError(f"--calib {path}:{no}: \"image\" must be a path and \"images\" a list of paths")
        resolved = [str(p if (p := Path(i)).is_absolute() else path.parent / p) for i in images]
        for r in resolved:
            if not Path(r).is_file():
                raise MmcError(f"--calib {path}:{no}: image {r} does not exist")
        samples.append(Sample(obj["text"], resolved))
    if not samples:
        raise MmcError(f"--calib {path}: no samples (one JSON object per line)")
    return samples


# ---- feeds --------------------------------------------------------------------------------
def empty_past(meta: dict, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, meta["num_kv_heads"], 0, meta["head_dim"])
    return {f"past_{kv}_{i}": np.zeros(shape, np.float32)
            for i in range(meta["num_layers"]) for kv in ("key", "value")}


def text_window_feeds(ids: np.ndarray, embed: np.ndarray, meta: dict) -> dict[str, np.ndarray]:
    """A prefill over token windows ids [B, S] (positions from 0, no padding)."""
    b, s = ids.shape
    pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
    if meta.get("mrope"):
        pos = np.broadcast_to(pos, (3, b, s))
    return {"inputs_embeds": embed[ids].astype(np.float32), "position_ids": np.ascontiguousarray(pos),
            "attention_mask": np.ones((b, s), dtype=np.int64), **empty_past(meta, b)}


def build(model_dir: Path, meta: dict, embed: np.ndarray, samples: list[Sample] | None = None,
          vision_model=None, source: str = "built-in", method: str = "minmax",
          percentile: float = 99.99) -> Calibration:
    """Feeds for the float graphs. `samples=None`: the built-in set (text windows + generated
    images when `vision_model` is given); else exactly the given samples."""
    from mmc.runtime.batching import prepare_batch
    from mmc.runtime.processing import Processor
    from mmc.runtime.vision_glue import vision_feeds

    from .accuracy import calibration_ids
    from .numerics import Runner

    if method not in METHODS:
        raise MmcError(f"unknown calibration method {method!r} (one of {', '.join(METHODS)})")
    if not 50 < percentile <= 100:
        raise MmcError(f"--calib-percentile must be in (50, 100] (got {percentile})")
    feeds: dict[str, list[dict]] = {"decoder": [], "vision": []}
    ids_out: list[np.ndarray] = []
    if samples is None:
        ids = calibration_ids(model_dir, meta["vocab_size"])
        feeds["decoder"].append(text_window_feeds(ids, embed, meta))
        ids_out.append(ids)
        samples = builtin_samples(vision_model is not None)
    if samples:
        if any(s.images for s in samples) and vision_model is None:
            raise MmcError("the calibration set has images but this model has no vision tower")
        processor = Processor(model_dir, meta)
        vision = Runner(vision_model) if vision_model is not None else None

        def encode(pixels, grid):
            f = vision_feeds(pixels, grid, meta)
            feeds["vision"].append(f)
            return vision.run(f)["image_embeds"]

        for s in samples:
            prepared, emb, pos, mask, _ = prepare_batch(processor, meta, embed.__getitem__, encode, [s.text],
                                                        [s.images], meta.get("mrope", False))
            feeds["decoder"].append({"inputs_embeds": emb, "position_ids": pos, "attention_mask": mask,
                                     **empty_past(meta, 1)})
            ids_out.append(prepared[0].input_ids[None])
    if not feeds["vision"]:
        del feeds["vision"]
    return Calibration(source, feeds, ids_out, method, percentile)


# ---- statistics ---------------------------------------------------------------------------
def collect(model, feed_sets: list[dict], tensors: list[str], seed: int = 0, axis: int = -1) -> dict[str, TensorStats]:
    """Run `model` (ModelProto; mmc ops lowered) over the feed sets and gather statistics of the
    named intermediate tensors, per channel along `axis`."""
    from .numerics import Runner

    runner = Runner(model, extra_outputs=tensors)
    chan: dict[str, np.ndarray] = {}
    absvals: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feeds in feed_sets:
        out = runner.run(feeds)
        for t in tensors:
            x = np.moveaxis(out[t], axis, -1)
            a = np.abs(x.astype(np.float32)).reshape(-1, x.shape[-1])
            m = a.max(axis=0) if a.size else np.zeros(a.shape[-1], np.float32)
            chan[t] = np.maximum(chan[t], m) if t in chan else m
            absvals[t].append(a.reshape(-1))
    rng = np.random.default_rng(seed)
    stats = {}
    for t in tensors:
        vals = np.concatenate(absvals[t]) if absvals[t] else np.zeros(0, np.float32)
        if vals.size > MAX_SAMPLES:
            vals = rng.choice(vals, MAX_SAMPLES, replace=False)
        stats[t] = TensorStats(float(chan[t].max()) if t in chan and chan[t].size else 0.0,
                               chan.get(t, np.zeros(0, np.float32)), vals)
    return stats
