"""Debug aid for the cuda target: the tiny preset's prefill and 4 teacher-forced decode steps on
the CPU, on CUDA eagerly and on CUDA with graph replay; prints max|Δ logits| against the CPU and
the argmax per step. On the GPU machine: python3 tools/debug_cuda_decode.py"""
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmc.api import compile_model
from mmc.models.qwen2_5_vl.presets import build_checkpoint
from mmc.runtime import load

work = Path(tempfile.mkdtemp())
ckpt = build_checkpoint("tiny-qwen2.5-vl", work / "ckpt")
eng = work / "e.mmc"
compile_model(str(ckpt), output=eng, target="cuda", precision="fp32", progress=False)
variants = {"cpu": load(eng, device="cpu", max_seq_len=64),
            "eager": load(eng, device="cuda", max_seq_len=64, cuda_graphs=False),
            "graph": load(eng, device="cuda", max_seq_len=64)}
ref = variants["cpu"]
_, embeds, pos, mask, next_pos = ref._prepare_batch(["The quick brown"], [[]])
states = {k: v.prefill(embeds, pos, mask) for k, v in variants.items()}
tok = states["cpu"][0].argmax(-1)
for k, (lg, _) in states.items():
    print("prefill", k, float(np.abs(lg - states["cpu"][0]).max()))
for step in range(4):
    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    p = np.broadcast_to(next_pos[:, None], (3, 1, 1)).copy()
    outs = {k: v.decode_one_token(tok, p, mask, states[k][1])[0] for k, v in variants.items()}
    next_pos = next_pos + 1
    for k, lg in outs.items():
        print("step", step, k, float(np.abs(lg - outs["cpu"]).max()), int(lg.argmax()))
    tok = outs["cpu"].argmax(-1)
sys.stdout.flush()
