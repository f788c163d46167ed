"""The runtime's numpy index math equals transformers' own utilities and get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import vision_utils

from mmc.runtime.vision_glue import mrope_positions, patch_positions, vision_indices, window_index

GRIDS = [[[1, 12, 18]], [[1, 8, 8]], [[1, 6, 10], [2, 4, 6]], [[1, 34, 50]], [[3, 2, 2], [1, 16, 4]]]


@pytest.mark.parametrize("grids", GRIDS)
def test_indices_match_transformers(grids):
    g = np.asarray(grids)
    tg = torch.tensor(grids)
    ref_pos = vision_utils.get_vision_position_ids(tg, 2).numpy()
    np.testing.assert_array_equal(patch_positions(g, 2), ref_pos)
    ref_win, ref_cu = vision_utils.get_vision_window_index(tg, spatial_merge_size=2, window_size=112, patch_size=14)
    win, cu = window_index(g, 2, 112, 14)
    np.testing.assert_array_equal(win, ref_win.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())
    vi = vision_indices(g, 2, 112, 14)
    np.testing.assert_array_equal(vi.window_index[vi.reverse_index], np.arange(len(win)))
    ref_full = vision_utils.get_vision_cu_seqlens(tg).numpy()
    assert np.bincount(vi.seg_full).tolist() == np.diff(ref_full).tolist()
    assert np.bincount(vi.seg_window).tolist() == np.diff(ref_cu.numpy()).tolist()


def test_mrope_positions_match_get_rope_index(hf_model):
    cfg = hf_model.config
    img = cfg.image_token_id
    grids = np.array([[1, 12, 18], [1, 4, 6]])
    ids = [5, 6, cfg.vision_start_token_id] + [img] * (12 * 18 // 4) + [cfg.vision_end_token_id, 7, 8, 9,
                                                                       cfg.vision_start_token_id]
    ids += [img] * (4 * 6 // 4) + [cfg.vision_end_token_id, 10]
    t = torch.tensor([ids])
    ref, ref_delta = hf_model.model.get_rope_index(t, mm_token_type_ids=(t == img).int(),
                                                   image_grid_thw=torch.from_numpy(grids))
    pos, delta = mrope_positions(np.array(ids), img, grids, 2)
    np.testing.assert_array_equal(pos, ref[:, 0].numpy())
    assert delta == int(ref_delta[0, 0])
    text_pos, text_delta = mrope_positions(np.array([1, 2, 3]), img, np.zeros((0, 3)), 2)
    assert text_delta == 0 and text_pos.tolist() == [[0, 1, 2]] * 3
