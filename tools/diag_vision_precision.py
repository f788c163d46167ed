"""Is a low logits cosine against transformers bf16 the engine's error or the model's own bf16
sensitivity? Compares, on one workload of the real-size preset with random weights: transformers
bf16 vs transformers fp32, and the mmc bf16 engine vs both. Run on the GPU machine:

    python tools/diag_vision_precision.py /tmp/mmc-bench/qwen2.5-vl-3b /tmp/mmc-bench/qwen2.5-vl-3b-bf16.mmc
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def main(ckpt: str, engine_dir: str) -> None:
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmc.runtime.cuda.engine import CudaEngine
    from mmc.runtime.vision_glue import mrope_positions

    eng = CudaEngine(engine_dir, device="cuda", max_seq_len=1024, verify=False)
    img = Path("/tmp/diag448.png")
    Image.fromarray((np.random.default_rng(1).random((448, 448, 3)) * 255).astype(np.uint8)).save(img)
    p = eng.processor.prepare("Describe this image in detail.", [str(img)])
    ids, pix, grid = p.input_ids, p.pixel_values, p.image_grid_thw
    h = eng.host
    ours_img = torch.from_numpy(eng.encode_images(pix, grid)).float()
    embeds = eng.embed(ids).copy()
    embeds[ids == h["image_token_id"]] = ours_img.numpy()
    pos, _ = mrope_positions(ids, h["image_token_id"], grid, h["spatial_merge_size"])
    ours, _ = eng._prefill_logits(embeds[None].astype(np.float32), pos[:, None, :], np.ones((1, len(ids)), dtype=np.int64))
    ours = ours[0].float().cpu()
    cos = torch.nn.functional.cosine_similarity
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        m = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=dt, attn_implementation="sdpa").cuda().eval()
        with torch.inference_mode():
            px = torch.from_numpy(pix).cuda().to(dt)
            vis = m.model.visual(px, grid_thw=torch.from_numpy(grid).cuda())
            vis = (vis.pooler_output if hasattr(vis, "pooler_output") else vis).float().cpu()
            tt = torch.from_numpy(ids == h["image_token_id"]).int()[None].cuda()  # M-RoPE needs it in transformers 5
            lg = m(input_ids=torch.from_numpy(ids)[None].cuda(), pixel_values=px, mm_token_type_ids=tt,
                   image_grid_thw=torch.from_numpy(grid).cuda()).logits[0, -1].float().cpu()
        res[str(dt)] = (vis, lg)
        del m
        torch.cuda.empty_cache()
    (v32, l32), (v16, l16) = res["torch.float32"], res["torch.bfloat16"]
    def c(a, b):
        return cos(a.reshape(-1), b.reshape(-1), dim=0).item()
    print(f"vision embeds: hf-bf16 vs hf-fp32 {c(v16, v32):.6f}; mmc-bf16 vs hf-fp32 {c(ours_img, v32):.6f}; "
          f"mmc vs hf-bf16 {c(ours_img, v16):.6f}")
    print(f"last logits:   hf-bf16 vs hf-fp32 {c(l16, l32):.6f}; mmc-bf16 vs hf-fp32 {c(ours, l32):.6f}; "
          f"mmc vs hf-bf16 {c(ours, l16):.6f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
