"""Qwen2.5-VL presets: the embedded tiny default and real-size configs with dummy weights.

`build_checkpoint(name, out_dir)` writes a Hugging Face checkpoint directory exactly as
`save_pretrained` would (config, safetensors weights, tokenizer, image processor), built
entirely on this machine: the weights come from a seeded random init, the tokenizer is a
byte-level BPE trained on a small embedded text, the processor is transformers' own
Qwen2-VL image processor. Nothing is downloaded.

Presets:
- `tiny-qwen2.5-vl` (the default): 2 decoder layers of width 64, a 4-block vision tower with
  windowed + full attention. Its decoder starts from transformers' own init (std 0.02) and is
  then trained for a few seconds on the embedded corpus (seeded), so it behaves like a real
  LM: peaked next-token distributions with wide top-1 margins, not a chaotic random net (a
  random net with wide init amplifies any perturbation, which would make quantization
  accuracy meaningless to measure). The vision tower keeps its random init. Small enough for
  CI, same architecture.
- `qwen2.5-vl-3b`, `qwen2.5-vl-7b`: the published architecture sizes with RANDOM weights, for
  benchmarks only (their output text is meaningless).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A few sentences for the tiny tokenizer's BPE merges (any text works; this keeps it readable).
_CORPUS = """\
A picture shows a red car parked next to a small house with a green door.
Describe the image in one sentence. What color is the sky? The sky is blue and clear.
Two cats sleep on a sofa while a dog watches the window. The quick brown fox jumps over the lazy dog.
Vision language models read images and text together and answer questions about what they see.
Compile the model, run the engine, generate tokens one by one with a key value cache.
"""


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    random_weights: bool
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    tie_word_embeddings: bool = True
    bpe_vocab: int = 400
    max_pixels: int = 448 * 448
    train_steps: int = 0          # decoder training steps on the embedded corpus (0: random weights)


PRESETS: dict[str, Preset] = {
    "tiny-qwen2.5-vl": Preset(
        name="tiny-qwen2.5-vl",
        summary="tiny Qwen2.5-VL (2 layers, width 64), decoder trained on an embedded text; the default",
        random_weights=False,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                  initializer_range=0.02),
        vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                    fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, tokens_per_second=2, initializer_range=0.2),
        # untied head, trained decoder: greedy output follows the prompt and the image, with
        # top-1 margins >> fp32 noise
        tie_word_embeddings=False,
        train_steps=300,
    ),
    "qwen2.5-vl-3b": Preset(
        name="qwen2.5-vl-3b",
        summary="Qwen2.5-VL-3B architecture, RANDOM weights (benchmarks only)",
        random_weights=True,
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2),
        tie_word_embeddings=True,
        max_pixels=12845056,
    ),
    "qwen2.5-vl-7b": Preset(
        name="qwen2.5-vl-7b",
        summary="Qwen2.5-VL-7B architecture, RANDOM weights (benchmarks only)",
        random_weights=True,
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2),
        tie_word_embeddings=False,
        max_pixels=12845056,
    ),
}

REAL_VOCAB = 151936  # the published Qwen2.5-VL vocabulary size (3B/7B configs)


def build_tokenizer(out_dir: Path, vocab_size: int):
    """Train a byte-level BPE on the embedded corpus and save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    fast.chat_template = None
    fast.save_pretrained(out_dir)
    return fast


def train_decoder(model, tok, steps: int, lr: float = 3e-3, seed: int = 0) -> float:
    """Train the text decoder (not the vision tower) on the embedded corpus: AdamW, batches of
    8 windows of 64 tokens, seeded. A few seconds on a CPU for the tiny preset. Returns the
    last loss."""
    import torch

    data = torch.tensor(tok(_CORPUS * 4, add_special_tokens=False)["input_ids"])
    params = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 65, (8,), generator=gen)
        batch = torch.stack([data[s:s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def build_checkpoint(name: str, out_dir: str | Path, layers: int | None = None) -> Path:
    """Write preset `name` as a Hugging Face checkpoint directory at `out_dir` and return it.
    `layers` truncates the decoder to that many layers and the vision tower to as many blocks
    (full attention in the blocks the preset gives it, and in the last): real widths at a
    fraction of the size, for profiling per-layer costs (tools/profile_cuda.py)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    preset = PRESETS[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir, preset.bpe_vocab)
    model = preset_model(name, tok, layers)
    model.save_pretrained(out_dir)
    vc = preset.vision
    proc = Qwen2VLImageProcessorPil(
        patch_size=vc["patch_size"], merge_size=vc["spatial_merge_size"],
        temporal_patch_size=vc["temporal_patch_size"], min_pixels=56 * 56, max_pixels=preset.max_pixels,
    )
    proc.save_pretrained(out_dir)
    (out_dir / "mmc_preset.json").write_text(json.dumps(
        {"preset": name, "random_weights": preset.random_weights, "summary": preset.summary}, indent=1))
    return out_dir


def preset_model(name: str, tok, layers: int | None = None, device: str = "cpu"):
    """Preset `name` as a transformers model (eval mode) with its seeded init, trained where the
    preset says so, in the preset's dtype (float32 tiny, bfloat16 real-size); `tok` is its
    tokenizer (build_tokenizer), whose special-token ids the config records. `device`: where the
    init runs (the same seed gives other values on a GPU than on the CPU)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    preset = PRESETS[name]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tiny = name.startswith("tiny")
    vocab = len(tok) if tiny else REAL_VOCAB
    text = dict(preset.text, vocab_size=vocab, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(preset.vision)
    if layers:
        text["num_hidden_layers"] = layers
        full = [i for i in vision["fullatt_block_indexes"] if i < layers - 1]
        vision.update(depth=layers, fullatt_block_indexes=full + [layers - 1])
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=preset.tie_word_embeddings,
    )
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    if preset.train_steps:
        train_decoder(model, tok, preset.train_steps)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model
