"""Host-side index math for Qwen2.5-VL vision and M-RoPE, in numpy.

These are the data-dependent parts of the model that no exporter can trace (they loop over each
image's `grid_thw`); the compiled graphs take their results as inputs instead. Each function
restates a transformers utility (`transformers.vision_utils.get_vision_position_ids`,
`get_vision_window_index`, `get_vision_cu_seqlens`, `Qwen2_5_VLModel.get_rope_index`) without
torch, so the runtime needs neither torch nor the model code; tests compare them to the originals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VisionIndices:
    """Everything the vision graph needs besides pixels, for a batch of images."""

    pos_hw: np.ndarray        # [N, 2] int64: (row, col) patch coordinates, merge-block-major order
    window_index: np.ndarray  # [N/unit] int64: merged-patch order for windowed attention
    reverse_index: np.ndarray  # [N/unit] int64: argsort(window_index), undoes the permutation
    seg_full: np.ndarray      # [N] int64: frame id of each (window-ordered) patch, for full attention
    seg_window: np.ndarray    # [N] int64: window id of each (window-ordered) patch


def patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """[N, 2] (h, w) coordinates of every patch, laid out merge-block-major (as the processor emits)."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def window_index(grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int):
    """(window_index [N/unit], cu_window_seqlens [W+1]) as in transformers' get_vision_window_index."""
    win = window_size // merge // patch_size  # window side in merged patches
    unit = merge * merge
    index_out, cu = [], [0]
    offset = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index_out.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu = np.asarray(cu, dtype=np.int64)
    cu = cu[np.concatenate([[True], np.diff(cu) != 0])]  # unique_consecutive: drop empty windows
    return np.concatenate(index_out).astype(np.int64), cu


def segment_ids(cu_seqlens: np.ndarray) -> np.ndarray:
    """[N] segment id per position from cumulative boundaries [0, n1, n1+n2, ...]."""
    return np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens)).astype(np.int64)


def vision_indices(grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int) -> VisionIndices:
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    widx, cu_win = window_index(grid_thw, merge, window_size, patch_size)
    frames = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])  # full attention per frame
    cu_full = np.concatenate([[0], np.cumsum(frames)])
    return VisionIndices(
        pos_hw=patch_positions(grid_thw, merge),
        window_index=widx,
        reverse_index=np.argsort(widx, kind="stable").astype(np.int64),
        seg_full=segment_ids(cu_full),
        seg_window=segment_ids(cu_win),
    )


def mrope_positions(
    input_ids: np.ndarray, image_token_id: int, image_grid_thw: np.ndarray, merge: int
) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, S] for one unpadded sequence and its rope delta (Qwen2.5-VL get_rope_index).

    Text tokens advance all three rows together; each run of image tokens gets (t, h, w) grid
    coordinates offset by the position where it starts, and the text after it resumes at
    start + max(h, w) / merge.
    """
    ids = np.asarray(input_ids).reshape(-1)
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3).tolist())
    pieces, pos, i = [], 0, 0
    while i < len(ids):
        j = i
        is_image = ids[i] == image_token_id
        while j < len(ids) and (ids[j] == image_token_id) == is_image:
            j += 1
        if not is_image:
            pieces.append(np.broadcast_to(np.arange(j - i) + pos, (3, j - i)))
            pos += j - i
        else:
            t, h, w = next(grids)
            gh, gw = h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([tt, hh, ww]).reshape(3, -1) + pos
            if block.shape[1] != j - i:
                raise ValueError(f"image occupies {j - i} tokens but its grid {t}x{h}x{w} needs {block.shape[1]}")
            pieces.append(block)
            pos += max(gh, gw)
        i = j
    positions = np.concatenate(pieces, axis=1).astype(np.int64) if pieces else np.zeros((3, 0), np.int64)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def vision_feeds(pixel_values: np.ndarray, grid_thw: np.ndarray, host: dict) -> dict[str, np.ndarray]:
    """The vision graph's inputs for preprocessed pixels of one or more images."""
    vi = vision_indices(grid_thw, host["spatial_merge_size"], host["window_size"], host["patch_size"])
    return {"pixel_values": pixel_values, "pos_hw": vi.pos_hw, "window_index": vi.window_index,
            "reverse_index": vi.reverse_index, "seg_full": vi.seg_full, "seg_window": vi.seg_window}
