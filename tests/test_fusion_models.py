"""Acceptance of the fusion library on exported models: tiny Qwen2.5-VL (decoder and vision)
and tiny transformers Llama / Qwen2 decoders, each from the dynamo exporter (default opset and
opset 23) and the TorchScript exporter. With `--passes all --verify-each` every layer shows its
norm fusions, one QKV merge, one SwiGLU merge, rotary and attention; every pass's numerical
check holds (fp32 logits max abs <= 1e-4); greedy tokens equal transformers'. A family with no
patterns written for it (GPT-NeoX: LayerNorm, partial rotary, parallel residual, GELU MLP)
compiles correctly, its unknown parts left as exported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_mmc

EXPORTS = {"dynamo": [], "dynamo-opset23": ["--opset", "23"], "torchscript": ["--exporter", "torchscript"]}
LAYERS = 2
MAX_NEW = 12
PROMPTS = ["The quick brown fox", "Two cats sleep on a sofa while"]


def compile_with_report(model_dir, out, flags):
    dump = out.parent / (out.name + "-dump")
    run_mmc("compile", model_dir, "--passes", "all", "--verify-each", "--dump-dir", dump, "-o", out, "-q", *flags)
    report = json.loads((dump / "report.json").read_text())
    hits: dict[tuple[str, str], int] = {}
    for rec in report["passes"]:
        for rule, n in rec["rewrites"].items():
            hits[(rec["component"], rule)] = hits.get((rec["component"], rule), 0) + n
        assert rec["check"] is not None, rec["name"]
        assert rec["check"]["max_abs_err"] <= 1e-4, (rec["component"], rec["name"], rec["check"])
    return hits


def decoder_hits(hits, comp="decoder"):
    """Per-kind totals across the exporter spellings of each rule."""
    def h(*rules):
        return sum(hits.get((comp, r), 0) for r in rules)
    return {"norm": h("rms-norm", "rms-norm-onnx"), "skip": h("skip-rms-norm"), "rotary": h("rotary", "rotary-onnx"),
            "attention": h("attention", "attention-onnx"), "qkv": h("merge-qkv"), "swiglu": h("swiglu"),
            "gate-up": h("merge-gate-up")}


# per layer: input + post-attention norm (+ the final norm), all but the first with a residual
DECODER_EXPECTED = {"norm": 2 * LAYERS + 1, "skip": 2 * LAYERS, "rotary": 2 * LAYERS, "attention": LAYERS,
                    "qkv": LAYERS, "swiglu": LAYERS, "gate-up": LAYERS}


def hf_greedy(model_dir, ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False)
    return seq[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("export", list(EXPORTS))
def test_decoder_families(family, export, lm_dir, tmp_path):
    from mmc.runtime import load

    model_dir = lm_dir(family)
    engine_path = tmp_path / f"{family}-{export}.mmc"
    hits = compile_with_report(model_dir, engine_path, EXPORTS[export])
    assert decoder_hits(hits) == DECODER_EXPECTED
    engine = load(engine_path, device="cpu")
    fused = engine.manifest["components"]["decoder"]["fused_ops"]
    assert fused["mmc.Attention"] == LAYERS and fused["mmc.SwiGLU"] == LAYERS
    for prompt in PROMPTS:
        ids = engine.processor.prepare(prompt).input_ids.tolist()
        assert engine.generate(prompt, max_new_tokens=MAX_NEW).token_ids == hf_greedy(model_dir, ids)


@pytest.mark.parametrize("export", ["dynamo-opset23", "torchscript"])
def test_qwen25_vl_exports(export, tiny_dir, hf_model, images, tmp_path):
    """The default dynamo export is covered by the shared `engine_all` engine (test_e2e_generate)."""
    from test_e2e_generate import hf_reference

    from mmc.runtime import load

    engine_path = tmp_path / f"vl-{export}.mmc"
    hits = compile_with_report(tiny_dir, engine_path, EXPORTS[export])
    assert decoder_hits(hits) == DECODER_EXPECTED
    vision = decoder_hits(hits, "vision")
    # 4 blocks: norm1/norm2 each (+ the merger's ln_q), all but the first after a residual add;
    # qkv is already one Linear in this tower; gate/up merge per block
    assert vision["norm"] == 9 and vision["skip"] == 8 and vision["attention"] == 4
    assert vision["swiglu"] == 4 and vision["gate-up"] == 4 and vision["rotary"] == 8
    engine = load(engine_path, device="cpu")
    prompt, paths = "What is in the picture?", [images["odd"]]
    expected = hf_reference(hf_model, tiny_dir, prompt, paths, MAX_NEW)
    assert engine.generate(prompt, images=paths, max_new_tokens=MAX_NEW).token_ids == expected


def test_engine_all_is_fused(engine_all):
    """The default compile (dynamo, all passes) of tiny Qwen2.5-VL fuses every layer."""
    from mmc.runtime.engine_format import read_manifest

    comps = read_manifest(engine_all)["components"]
    assert comps["decoder"]["fused_ops"] == {"mmc.Attention": 2, "mmc.RMSNorm": 1, "mmc.RotaryEmbedding": 4,
                                             "mmc.SkipRMSNorm": 4, "mmc.SwiGLU": 2}
    assert comps["vision"]["fused_ops"]["mmc.Attention"] == 4


def test_unseen_family_compiles_correctly(lm_dir, tmp_path):
    """GPT-NeoX: nobody wrote patterns for it. What matches generic rules fuses (LayerNorm,
    attention, the rotary half of partial rotary); the rest (GELU MLP, parallel residual,
    the fused query_key_value Linear) stays as exported; tokens equal transformers'."""
    from mmc.runtime import load

    model_dir = lm_dir("gpt_neox")
    engine_path = tmp_path / "neox.mmc"
    hits = compile_with_report(model_dir, engine_path, [])
    assert hits.get(("decoder", "attention"), 0) == LAYERS
    assert hits.get(("decoder", "swiglu"), 0) == 0 and hits.get(("decoder", "merge-qkv"), 0) == 0
    engine = load(engine_path, device="cpu")
    ops = engine.manifest["components"]["decoder"]["ops"]
    assert ops.get("Gelu", 0) + ops.get("Erf", 0) >= LAYERS  # its MLP activation, left as it was
    for prompt in PROMPTS:
        ids = engine.processor.prepare(prompt).input_ids.tolist()
        got = engine.generate(prompt, max_new_tokens=MAX_NEW).token_ids
        assert got == hf_greedy(model_dir, ids)
        assert len(np.unique(got)) > 1  # not a degenerate repeat that would match by accident
