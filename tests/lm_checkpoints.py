"""Tiny text-only checkpoints of transformers decoder families, written with save_pretrained
(random weights, norms included), with the tiny preset's tokenizer copied in."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, eos_token_id=2, bos_token_id=1)
FAMILIES = {
    "llama": dict(num_key_value_heads=2),                    # GQA, SwiGLU, RMSNorm, RoPE
    "qwen2": dict(num_key_value_heads=2),                    # + q/k/v biases
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True),  # no patterns written for it
}


def build(family: str, out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            else:  # norms and biases away from their 1 / 0 init, so a dropped weight shows
                p.uniform_(0.5, 1.5) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


def inject_outliers(src: Path, out: Path, channels=(3, 17, 41), factor: float = 100.0) -> Path:
    """A copy of the Qwen2.5-VL checkpoint `src` whose decoder activations have outlier channels,
    as trained LLMs do: each layer's two norm weights are multiplied by `factor` on `channels`
    and the rows of the GEMM weights that read them divided by it. The function is unchanged
    (exactly, up to float rounding); the inputs of the q/k/v and gate/up GEMMs now have a few
    channels `factor` times larger than the rest."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    shutil.copytree(src, out, dirs_exist_ok=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src).eval()
    ch = torch.tensor(list(channels))
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[ch] *= factor
                for lin in readers:
                    lin.weight[:, ch] /= factor
    model.save_pretrained(out)
    return out
