"""Accuracy of a quantized decoder against its float original, on calibration prompts.

Both graphs run a prefill (empty cache) in ONNX Runtime over the same token sequences (the
built-in calibration set: the model's own tokenizer on an embedded text, cut into windows).
Per position: cosine of the logit vectors, whether the top-1 token agrees, and the NLL of the
actual next token under each model.
"""

from __future__ import annotations

import numpy as np

from .numerics import run_model

CALIBRATION_TEXT = (
    "A picture shows a red car parked next to a small house with a green door. The sky is blue and "
    "clear, and two cats sleep on a sofa while a dog watches the window. Vision language models read "
    "images and text together and answer questions about what they see. Compile the model, run the "
    "engine, generate tokens one by one with a key value cache. The quick brown fox jumps over the "
    "lazy dog near the river bank, where children play and old men fish in the quiet afternoon light. "
    "Describe the image in one sentence, then count the objects on the table and name their colors."
)


def calibration_ids(model_dir, vocab: int, windows: int = 4, length: int = 64, seed: int = 0) -> np.ndarray:
    """[windows, length] token ids: the tokenizer on the text (repeated as needed), or seeded
    random ids when the checkpoint has no tokenizer."""
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(model_dir))(CALIBRATION_TEXT, add_special_tokens=False)["input_ids"]
        ids = np.asarray([i for i in ids if i < vocab], dtype=np.int64)
    except Exception:  # no usable tokenizer: random tokens still measure logit agreement
        ids = np.zeros(0, dtype=np.int64)
    if ids.size < 8:
        ids = np.random.default_rng(seed).integers(0, vocab, windows * length)
    ids = np.resize(ids, windows * length)
    return ids.reshape(windows, length)


def decoder_feeds(ids: np.ndarray, embed: np.ndarray, meta: dict) -> dict[str, np.ndarray]:
    b, s = ids.shape
    pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
    if meta.get("mrope"):
        pos = np.broadcast_to(pos, (3, b, s))
    feeds = {"inputs_embeds": embed[ids].astype(np.float32), "position_ids": np.ascontiguousarray(pos),
             "attention_mask": np.ones((b, s), dtype=np.int64)}
    for i in range(meta["num_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_{kv}_{i}"] = np.zeros((b, meta["num_kv_heads"], 0, meta["head_dim"]), np.float32)
    return feeds


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray, ids: np.ndarray) -> dict:
    """ref/got [B, S, V] logits; ids [B, S] the tokens (position t predicts ids[t+1])."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    g = got.reshape(-1, got.shape[-1]).astype(np.float64)
    cos = (r * g).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1), 1e-30)
    top1 = r.argmax(-1) == g.argmax(-1)
    nxt = ids[:, 1:].reshape(-1)
    lr, lg = _log_softmax(ref[:, :-1]).reshape(-1, ref.shape[-1]), _log_softmax(got[:, :-1]).reshape(-1, got.shape[-1])
    nll_ref, nll_got = -lr[np.arange(nxt.size), nxt].mean(), -lg[np.arange(nxt.size), nxt].mean()
    return {"positions": int(r.shape[0]), "logits_cosine_mean": float(cos.mean()),
            "logits_cosine_min": float(cos.min()), "top1_agreement": float(top1.mean()),
            "nll_float": float(nll_ref), "nll_quantized": float(nll_got)}


def decoder_accuracy(float_model, quant_model, ids: np.ndarray, embed: np.ndarray, meta: dict) -> dict:
    feeds = decoder_feeds(ids, embed, meta)
    ref = run_model(float_model, feeds)["logits"]
    got = run_model(quant_model, feeds)["logits"]
    return compare_logits(ref, got, ids)


def budget_search(graph, originals: dict, float_model, ids, embed, meta: dict, min_top1: float,
                  max_steps: int = 64) -> dict:
    """Greedy accuracy budget: while top-1 agreement < `min_top1`, try putting each quantized
    GEMM of `graph` back in float (its original weight from `originals`, node name -> weight),
    keep the one that helps most, repeat. `graph` is modified in place; returns what was kept
    and the accuracy reached."""
    from . import ir

    def accuracy() -> dict:
        return decoder_accuracy(float_model, ir.to_model(graph), ids, embed, meta)

    by_name = {n.name: n for n in graph.nodes if n.op == "MatMul" and n.name in originals}
    current, kept, evaluations = accuracy(), [], 1
    while current["top1_agreement"] < min_top1 and by_name and len(kept) < max_steps:
        best = None
        for name, node in by_name.items():
            quantized = node.inputs[1]
            node.inputs[1] = originals[name]
            trial = accuracy()
            evaluations += 1
            node.inputs[1] = quantized
            key = (trial["top1_agreement"], trial["logits_cosine_mean"])
            if best is None or key > best[0]:
                best = (key, name, trial)
        _, name, current = best
        by_name.pop(name).inputs[1] = originals[name]
        kept.append(name)
    graph.cleanup(remove_unused_graph_inputs=False)
    return {"min_top1": min_top1, "met": current["top1_agreement"] >= min_top1, "kept_float": kept,
            "evaluations": evaluations, "accuracy": current}
