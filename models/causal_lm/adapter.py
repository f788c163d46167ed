"""Adapter for text-only causal LMs: one component, the decoder with an explicit KV cache.

    decoder: inputs_embeds [B, S, H], position_ids [B, S], attention_mask [B, P+S],
             past_{key,value}_i [B, KV, P, D] -> logits [B, S, V], present_{key,value}_i

Any `model_type` that transformers' `AutoModelForCausalLM` loads and whose layers use the
standard `DynamicCache` exports through the same wrapper as Qwen2.5-VL's language model; the
passes then fuse whatever they recognize and leave the rest as exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmc.errors import MmcError, first_line
from mmc.models.decoder_export import ExportedComponent, check_exporter, decoder_feeds, export_decoder

ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.json",
               "chat_template.jinja")

class CausalLMAdapter:
    def __init__(self, model_dir: Path, config: dict):
        self.model_dir, self.config = model_dir, config
        self.family = config["model_type"]
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in config:
                raise MmcError(f"{model_dir}/config.json lacks {key!r}: not a complete {self.family} config")

    def host_metadata(self) -> dict:
        c = self.config
        heads = c["num_attention_heads"]
        gen = {}
        gpath = self.model_dir / "generation_config.json"
        if gpath.is_file():
            gen = json.loads(gpath.read_text())
        eos = gen.get("eos_token_id", c.get("eos_token_id"))
        return {
            "family": self.family,
            "hidden_size": c["hidden_size"],
            "num_layers": c["num_hidden_layers"],
            "num_kv_heads": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
            "vocab_size": c["vocab_size"],
            "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
            "pad_token_id": gen.get("pad_token_id", c.get("pad_token_id")),
            "mrope": False,
        }

    def load_torch_model(self):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32,
                                                         attn_implementation="sdpa")
        except Exception as e:  # safetensors/transformers raise many types for a broken checkpoint
            raise MmcError(f"cannot load the checkpoint in {self.model_dir}: {type(e).__name__}: {first_line(e)}") from e
        return model.eval()

    def host_weights(self, model) -> dict[str, np.ndarray]:
        emb = model.get_input_embeddings().weight.detach().float().numpy()
        return {"embed_tokens": np.ascontiguousarray(emb)}

    def export(self, model, work_dir: Path, exporter: str = "dynamo", seed: int = 0,
               opset: int | None = None) -> list[ExportedComponent]:
        from mmc.models.decoder_export import make_cached_decoder

        check_exporter(exporter, opset)
        work_dir.mkdir(parents=True, exist_ok=True)
        meta = self.host_metadata()
        wrapper = make_cached_decoder(model.base_model, model.get_output_embeddings(), meta["num_layers"])
        path = export_decoder(wrapper, work_dir / "decoder.onnx", exporter, meta, opset)
        return [ExportedComponent("decoder", path, decoder_feeds(meta, np.random.default_rng(seed)))]

    def asset_files(self) -> list[Path]:
        return [self.model_dir / f for f in ASSET_FILES if (self.model_dir / f).is_file()]
