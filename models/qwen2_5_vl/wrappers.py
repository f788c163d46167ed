"""Export wrappers for Qwen2.5-VL: the parts of the model with static control flow only.

`VisionTower` runs the vision transformer over a packed batch of patches with every
data-dependent index (window permutation, segment ids, patch coordinates) as a graph input, so
no image size is baked into the trace. Windowed and full attention both become one SDPA over
all patches with a block-diagonal mask built in-graph from segment ids
(mask[i, j] = seg[i] == seg[j]); the per-window split loop of transformers is gone.

The text decoder uses the family-independent wrapper in `mmc.models.decoder_export`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision


class VisionTower(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.unit = cfg.spatial_merge_size**2
        self.full_blocks = set(cfg.fullatt_block_indexes)

    def forward(self, pixel_values, pos_hw, window_index, reverse_index, seg_full, seg_window):
        # pixel_values [N, C*T*P*P]; pos_hw [N, 2]; window_index/reverse_index [N/unit]; seg_* [N]
        v = self.visual
        h = v.patch_embed(pixel_values)  # [N, C]
        n, c = h.shape
        h = h.reshape(n // self.unit, self.unit, c)[window_index].reshape(n, c)
        freqs = pos_hw.unsqueeze(-1).float() * v.rotary_pos_emb.inv_freq  # [N, 2, d/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [N, d/2]
        freqs = freqs.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, d]
        cos, sin = emb.cos(), emb.sin()
        # block-diagonal masks: a patch sees only patches of its own frame / window
        mask_full = (seg_full.unsqueeze(1) == seg_full.unsqueeze(0))[None, None]  # [1, 1, N, N]
        mask_win = (seg_window.unsqueeze(1) == seg_window.unsqueeze(0))[None, None]
        for i, blk in enumerate(v.blocks):
            mask = mask_full if i in self.full_blocks else mask_win
            h = h + self._attention(blk.attn, blk.norm1(h), cos, sin, mask)
            h = h + blk.mlp(blk.norm2(h))
        merged = v.merger(h)  # [N/unit, out_hidden]
        return merged[reverse_index]

    @staticmethod
    def _attention(attn, x, cos, sin, mask):
        n = x.shape[0]
        q, k, val = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, H, D]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, val = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, val))  # [1, H, N, D]
        out = F.scaled_dot_product_attention(q, k, val, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))
