"""Qwen2.5-VL family adapter: what to export, with which dynamic axes, and what the host needs.

Components:
- `vision`: pixel_values [N, 3*2*14*14] + index inputs (see `wrappers.VisionTower`) ->
  image_embeds [N/4, hidden]. N (patches) and M (merged patches) are dynamic.
- `decoder`: inputs_embeds [B, S, H], position_ids [3, B, S], attention_mask [B, T],
  past_{key,value}_i [B, KV, P, D] -> logits [B, S, V], present_{key,value}_i [B, KV, T, D]
  with T = P + S. B, S, P, T dynamic; traced at B=2, S=3, P=4 (EXPORT-NOTES: S=1 or P=0 traps).

Host side (runtime): token embedding lookup, image-token merge, M-RoPE positions and the
vision index inputs (`mmc.runtime.vision_glue`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmc.errors import MmcError, first_line
from mmc.models.decoder_export import ExportedComponent, check_exporter, decoder_feeds

ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.json",
               "chat_template.jinja", "preprocessor_config.json", "mmc_preset.json")

class Qwen25VLAdapter:
    family = "qwen2_5_vl"

    def __init__(self, model_dir: Path, config: dict):
        for key in ("vision_config", "image_token_id"):
            if key not in config:
                raise MmcError(f"{model_dir}/config.json lacks {key!r}: not a complete Qwen2.5-VL config")
        self.model_dir = model_dir
        self.config = config
        self.text = config["text_config"] if "text_config" in config else config
        self.vision = config["vision_config"]

    # ---- host metadata ------------------------------------------------------------------
    def host_metadata(self) -> dict:
        t, v = self.text, self.vision
        heads = t["num_attention_heads"]
        gen = {}
        gpath = self.model_dir / "generation_config.json"
        if gpath.is_file():
            gen = json.loads(gpath.read_text())
        eos = gen.get("eos_token_id", t.get("eos_token_id", self.config.get("eos_token_id")))
        return {
            "family": self.family,
            "hidden_size": t["hidden_size"],
            "num_layers": t["num_hidden_layers"],
            "num_kv_heads": t.get("num_key_value_heads", heads),
            "head_dim": t.get("head_dim") or t["hidden_size"] // heads,
            "vocab_size": t["vocab_size"],
            "image_token_id": self.config["image_token_id"],
            "video_token_id": self.config.get("video_token_id"),
            "vision_start_token_id": self.config.get("vision_start_token_id"),
            "vision_end_token_id": self.config.get("vision_end_token_id"),
            "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
            "pad_token_id": gen.get("pad_token_id", t.get("pad_token_id")),
            "spatial_merge_size": v["spatial_merge_size"],
            "window_size": v["window_size"],
            "patch_size": v["patch_size"],
            "temporal_patch_size": v["temporal_patch_size"],
            "in_channels": v.get("in_channels", 3),
            "mrope": True,
        }

    # ---- export ------------------------------------------------------------------------
    def load_torch_model(self):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                self.model_dir, dtype=torch.float32, attn_implementation="sdpa")
        except Exception as e:  # safetensors/transformers raise many types for a broken checkpoint
            raise MmcError(f"cannot load the checkpoint in {self.model_dir}: {type(e).__name__}: {first_line(e)}") from e
        return model.eval()

    def host_weights(self, model) -> dict[str, np.ndarray]:
        emb = model.model.language_model.embed_tokens.weight.detach().float().numpy()
        return {"embed_tokens": np.ascontiguousarray(emb)}

    def export(self, model, work_dir: Path, exporter: str = "dynamo", seed: int = 0,
               opset: int | None = None) -> list[ExportedComponent]:
        check_exporter(exporter, opset)
        from . import export_graphs

        work_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        meta = self.host_metadata()
        vision_path = export_graphs.export_vision(model, work_dir / "vision.onnx", exporter, meta, opset)
        decoder_path = export_graphs.export_decoder(model, work_dir / "decoder.onnx", exporter, meta, opset)
        return [
            ExportedComponent("vision", vision_path, export_graphs.vision_feeds(meta, rng)),
            ExportedComponent("decoder", decoder_path, decoder_feeds(meta, rng)),
        ]

    def asset_files(self) -> list[Path]:
        return [self.model_dir / f for f in ASSET_FILES if (self.model_dir / f).is_file()]
