"""Prompts + images -> the decoder's prefill inputs for a left-padded batch.

    processor.prepare        -> input_ids, pixel_values, grid_thw per prompt
    encode_images(pixels)    -> image_embeds, scattered into the image-pad rows of embed(input_ids)
    mrope_positions          -> position_ids [3, B, S] (M-RoPE) or [B, S], and the next position

Shared by the engine (its vision graph encodes the images) and by calibration at compile time
(the float vision graph encodes them), so both see exactly the same decoder inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .vision_glue import mrope_positions


def prepare_batch(processor, host: dict, embed: Callable, encode_images: Callable, prompts: list[str],
                  images: list[list], mrope: bool):
    """-> (prepared inputs per prompt, embeds [B, S, H], positions, mask [B, S], next position [B])."""
    prepared = [processor.prepare(p, ims) for p, ims in zip(prompts, images)]
    image_embeds = [None] * len(prepared)
    pix = [p.pixel_values for p in prepared if p.pixel_values is not None]
    if pix:
        grids = np.concatenate([p.image_grid_thw for p in prepared])
        all_embeds = encode_images(np.concatenate(pix), grids)
        counts = [int(p.image_grid_thw.prod(-1).sum()) // host["spatial_merge_size"] ** 2 for p in prepared]
        image_embeds = np.split(all_embeds, np.cumsum(counts)[:-1])
    b, s = len(prepared), max(len(p.input_ids) for p in prepared)
    pad = host.get("pad_token_id") or 0
    embeds = np.zeros((b, s, host["hidden_size"]), dtype=np.float32)
    positions = np.zeros((3, b, s), dtype=np.int64)
    mask = np.zeros((b, s), dtype=np.int64)
    next_pos = np.zeros(b, dtype=np.int64)
    for i, p in enumerate(prepared):
        n, off = len(p.input_ids), s - len(p.input_ids)  # left padding
        e = embed(p.input_ids).copy()
        if image_embeds[i] is not None:
            e[p.input_ids == host["image_token_id"]] = image_embeds[i]
        embeds[i, off:] = e
        embeds[i, :off] = embed(np.asarray([pad]))
        if mrope:
            pos, delta = mrope_positions(p.input_ids, host["image_token_id"], p.image_grid_thw,
                                         host["spatial_merge_size"])
        else:
            pos, delta = np.arange(n), 0
        positions[:, i, off:] = pos
        positions[:, i, :off] = 1
        mask[i, off:] = 1
        next_pos[i] = n + delta
    return prepared, embeds, positions if mrope else positions[0], mask, next_pos
