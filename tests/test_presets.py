"""Real-size presets have the published architecture: the decoder weights read per token match
PERF.md (3B: 3.09 G, 7B: 7.07 G), counted on the meta device (no memory, no download)."""

from __future__ import annotations

import pytest
import torch

from mmc.models.qwen2_5_vl.presets import PRESETS, REAL_VOCAB


@pytest.mark.parametrize("name,billions", [("qwen2.5-vl-3b", 3.09), ("qwen2.5-vl-7b", 7.07)])
def test_real_size_preset_param_counts(name, billions):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    p = PRESETS[name]
    cfg = Qwen2_5_VLConfig(text_config=dict(p.text, vocab_size=REAL_VOCAB), vision_config=dict(p.vision),
                           tie_word_embeddings=p.tie_word_embeddings)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    lm = model.model.language_model
    per_token = sum(t.numel() for n, t in lm.named_parameters() if "embed_tokens" not in n)
    per_token += model.lm_head.weight.numel()  # tied or not, the head is read every token
    assert abs(per_token / 1e9 - billions) < 0.01
    assert p.random_weights and "RANDOM" in p.summary
