"""Accuracy of a quantized decoder against its float original, on the calibration prompts.

Both graphs run prefills (empty cache) in ONNX Runtime over the same decoder feeds
(`calibration.Calibration`: the built-in set — the model's own tokenizer on an embedded text,
cut into windows, plus generated images for VL models — or the user's `--calib` prompts).
Per position: cosine of the logit vectors, whether the top-1 token agrees, and the NLL of the
actual next token under each model. Per GEMM: the SNR of its output against the float graph.
The budget search puts the most harmful GEMMs back in float until top-1 agreement holds.
"""

from __future__ import annotations

import numpy as np

from .numerics import Runner

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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(refs: list[np.ndarray], gots: list[np.ndarray], ids: list[np.ndarray]) -> dict:
    """Per feed set: ref/got [B, S, V] logits, ids [B, S] its tokens (position t predicts ids[t+1]).
    Cosine and top-1 agreement over all positions, NLL over the predicted ones."""
    cos, top1, nll_r, nll_g = [], [], [], []
    for ref, got, tok in zip(refs, gots, ids):
        r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        g = got.reshape(-1, got.shape[-1]).astype(np.float64)
        cos.append((r * g).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1), 1e-30))
        top1.append(r.argmax(-1) == g.argmax(-1))
        nxt = tok[:, 1:].reshape(-1)
        lr = _log_softmax(ref[:, :-1]).reshape(-1, ref.shape[-1])
        lg = _log_softmax(got[:, :-1]).reshape(-1, got.shape[-1])
        nll_r.append(-lr[np.arange(nxt.size), nxt])
        nll_g.append(-lg[np.arange(nxt.size), nxt])
    cos, top1 = np.concatenate(cos), np.concatenate(top1)
    return {"positions": int(cos.size), "logits_cosine_mean": float(cos.mean()),
            "logits_cosine_min": float(cos.min()), "top1_agreement": float(top1.mean()),
            "nll_float": float(np.concatenate(nll_r).mean()), "nll_quantized": float(np.concatenate(nll_g).mean())}


def logits(model, cal) -> list[np.ndarray]:
    """The decoder's logits on every calibration feed set of `cal` (a calibration.Calibration)."""
    runner = Runner(model)
    return [runner.run(f)["logits"] for f in cal.feeds["decoder"]]


def decoder_accuracy(float_model, quant_model, cal, float_logits=None) -> dict:
    ref = float_logits if float_logits is not None else logits(float_model, cal)
    return compare_logits(ref, logits(quant_model, cal), cal.ids)


def output_snr(float_model, quant_model, feed_sets: list[dict], tensors: list[str]) -> dict[str, float]:
    """SNR (dB) of each named tensor of the quantized graph against the float graph on the same
    feeds: the error each GEMM output carries, everything upstream of it included."""
    ref, got = Runner(float_model, tensors), Runner(quant_model, tensors)
    signal, noise = dict.fromkeys(tensors, 0.0), dict.fromkeys(tensors, 0.0)
    for feeds in feed_sets:
        r, g = ref.run(feeds), got.run(feeds)
        for t in tensors:
            a = r[t].astype(np.float64)
            signal[t] += float((a ** 2).sum())
            noise[t] += float(((a - g[t]) ** 2).sum())
    return {t: round(10 * np.log10(signal[t] / noise[t]), 2) if noise[t] else float("inf") for t in tensors}


def budget_search(graph, originals: dict, float_model, cal, min_top1: float, max_steps: int = 64) -> dict:
    """Greedy accuracy budget: while top-1 agreement < `min_top1`, try putting each quantized
    GEMM of `graph` back in float (its original inputs from `originals`, node name -> inputs:
    float weight, and the float activation for W8A8), keep the one that helps most, repeat.
    `graph` is modified in place; returns what was kept and the accuracy reached."""
    from . import ir

    ref = logits(float_model, cal)

    def accuracy() -> dict:
        return decoder_accuracy(None, ir.to_model(graph), cal, ref)

    def swap(node, inputs) -> list:
        before = list(node.inputs)
        for i, t in enumerate(inputs):
            node.inputs[i] = t
        return before

    by_name = {n.name: n for n in graph.nodes if n.op == "MatMul" and n.name in originals}
    current, kept, evaluations = accuracy(), [], 1
    while current["top1_agreement"] < min_top1 and by_name and len(kept) < max_steps:
        best = None
        for name, node in by_name.items():
            quantized = swap(node, originals[name])
            trial = accuracy()
            evaluations += 1
            swap(node, quantized)
            key = (trial["top1_agreement"], trial["logits_cosine_mean"])
            if best is None or key > best[0]:
                best = (key, name, trial)
        _, name, current = best
        swap(by_name.pop(name), originals[name])
        kept.append(name)
    graph.cleanup(remove_unused_graph_inputs=False)
    return {"min_top1": min_top1, "met": current["top1_agreement"] >= min_top1, "kept_float": kept,
            "evaluations": evaluations, "accuracy": current}
