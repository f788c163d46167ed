"""Quantized KV cache (`--kv-cache int8|fp8`): the per-head helpers against float64, the
pass's placement and scales on a hand-built graph executed by ONNX Runtime (what it quantizes,
what it must leave alone), and the tiny preset end to end: the manifest's cache types, the
report, and decode steps with the quantized cache against the float engine, teacher-forced."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_mmc
from graphs import helper

from mmc import quantization as qz
from mmc.calibration import Calibration

rng = np.random.default_rng(11)
KINDS = ["int8", "fp8"]


@pytest.mark.parametrize("kind", KINDS)
def test_per_head_quantization_against_float64(kind):
    x = rng.standard_normal((2, 3, 7, 16)) * np.array([0.1, 1.0, 30.0])[None, :, None, None]
    x[:, :, 0, 0] = [0.0, 1e-4, -5.0]
    amax = np.abs(x).max(axis=(0, 2, 3))
    s = qz.kv_scale(amax, kind)
    top = 127 if kind == "int8" else 448
    np.testing.assert_allclose(s, amax / top, rtol=1e-7)
    assert qz.kv_scale(np.zeros(2), kind).tolist() == [1.0, 1.0]  # an all-zero head
    codes = qz.quantize_per_head(x.astype(np.float32), s, kind)
    assert codes.dtype == qz.kv_dtype(kind)
    back = qz.dequantize_per_head(codes, s).astype(np.float64)
    err = np.abs(back - x)
    if kind == "int8":
        assert (err <= s.reshape(1, -1, 1, 1) / 2 * (1 + 1e-5)).all()  # half a step
        assert np.abs(codes.astype(np.int32)).max() == 127
    else:  # 3 mantissa bits: half an ulp is 2^-4 relative; below 2^-6 * s the subnormal step 2^-9 * s
        bound = np.maximum(np.abs(x) * 2.0 ** -4, s.reshape(1, -1, 1, 1) * 2.0 ** -10)
        assert (err <= bound * (1 + 1e-5)).all()
    # beyond the calibrated range: saturate, never wrap
    big = qz.quantize_per_head(np.full((1, 3, 1, 1), 1e6, np.float32), s, kind).astype(np.float32)
    assert (big.reshape(-1) == top).all()


def _attention(name, q, ins, outs, **attrs):
    return helper.make_node("Attention", [q, *ins], outs, name=name, domain="mmc", num_heads=4, kv_heads=2,
                            scale=0.35, nan_to_zero=0, **attrs)


def _toy():
    """Three attentions over the same q/k/v: `cached` (cache in graph inputs/outputs, its past
    also read by Shape), `nocache` (the vision tower's form) and `shared` (its past is also read
    by a Neg: quantizing it would change that reader)."""
    T = onnx.TensorProto
    f = lambda n, shape: helper.make_tensor_value_info(n, T.FLOAT, shape)  # noqa: E731
    nodes = [_attention("cached", "q", ["k", "v", "past_key_0", "past_value_0"], ["y0", "present_key_0", "present_value_0"]),
             helper.make_node("Shape", ["past_key_0"], ["plen"]),
             _attention("nocache", "q", ["k", "v"], ["yb"]),
             _attention("shared", "q", ["k", "v", "past_key_1", "past_value_1"], ["y1", "present_key_1", "present_value_1"]),
             helper.make_node("Neg", ["past_key_1"], ["negp"])]
    kvshape = [1, 2, "p", 8]
    inputs = [f("q", [1, 4, "s", 8]), f("k", [1, 2, "s", 8]), f("v", [1, 2, "s", 8])] + \
        [f(f"past_{x}_{i}", kvshape) for i in (0, 1) for x in ("key", "value")]
    outputs = [f("y0", None), f("present_key_0", None), f("present_value_0", None), f("yb", None), f("y1", None),
               f("present_key_1", None), f("present_value_1", None), f("negp", None),
               helper.make_tensor_value_info("plen", T.INT64, [4])]
    g = helper.make_graph(nodes, "kv", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("mmc", 1)],
                             ir_version=10)


def _feeds(s: int, p: int, head_gain=(1.0, 6.0)):
    gain = np.asarray(head_gain, np.float32).reshape(1, 2, 1, 1)
    out = {"q": rng.standard_normal((1, 4, s, 8)).astype(np.float32),
           "k": (rng.standard_normal((1, 2, s, 8)) * gain).astype(np.float32),
           "v": (rng.standard_normal((1, 2, s, 8)) * gain[:, ::-1]).astype(np.float32)}
    for i in (0, 1):
        for x in ("key", "value"):
            out[f"past_{x}_{i}"] = rng.standard_normal((1, 2, p, 8)).astype(np.float32)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_placement_scales_and_numerics(kind):
    from mmc.ir import import_model, to_model
    from mmc.lowering import lower_model
    from mmc.numerics import Runner
    from mmc.pass_manager import PassContext
    from mmc.registry import create, load_builtin_passes

    load_builtin_passes()
    g = import_model(_toy(), symbolic=False)
    cal = [_feeds(6, 0), _feeds(9, 0)]
    ctx = PassContext("decoder", current_pass="quantize-kv-cache",
                      options={"quant": qz.QuantConfig("float", kv_cache=kind),
                               "calibration": Calibration("test", {"decoder": cal}, [])})
    result = create("quantize-kv-cache").run(g, ctx)
    assert result.stats == {"quantized": 1, "skipped": 1}
    assert ctx.near_misses["kv-cache"] == {"node": "shared", "reason": "past_key_1 is read by Neg"}
    nodes = {n.name: n for n in g.nodes}
    cached = nodes["cached"]
    assert cached.attrs["kv_cache"] == kind and "kv_cache" not in nodes["nocache"].attrs \
        and "kv_cache" not in nodes["shared"].attrs
    assert len(cached.inputs) == 8 and cached.inputs[5].name == ""  # no mask: an empty slot before the scales
    top = 127 if kind == "int8" else 448
    for i, name in ((6, "k"), (7, "v")):  # per head: absmax over every calibration position
        amax = np.max([np.abs(f[name]).max(axis=(0, 2, 3)) for f in cal], axis=0)
        np.testing.assert_allclose(np.asarray(cached.inputs[i].values), amax / top, rtol=1e-6)
    types = {t.name: t.dtype for t in [*g.inputs, *g.outputs]}
    code = qz.kv_dtype(kind)
    assert all(np.dtype(types[n]) == code for n in ("past_key_0", "past_value_0", "present_key_0", "present_value_0"))
    assert all(np.dtype(types[n]) == np.float32 for n in ("past_key_1", "present_key_1"))

    # executed by ORT with a filled cache of codes, against float64 written out here
    model = to_model(g)
    ks, vs = (np.asarray(cached.inputs[i].values, np.float64).reshape(1, 2, 1, 1) for i in (6, 7))
    feeds = _feeds(3, 5)
    feeds["past_key_0"] = qz.quantize_per_head(feeds["past_key_0"] * 4, ks.reshape(-1), kind)
    feeds["past_value_0"] = qz.quantize_per_head(feeds["past_value_0"] * 4, vs.reshape(-1), kind)
    got = Runner(model).run(feeds)

    def codes(x, s):  # saturating: the test's k/v exceed the calibrated range a little
        if kind == "int8":
            return np.clip(np.rint(x / s), -128, 127)
        return np.clip(x / s, -top, top).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)

    kq = np.concatenate([feeds["past_key_0"].astype(np.float64), codes(feeds["k"].astype(np.float64), ks)], 2)
    vq = np.concatenate([feeds["past_value_0"].astype(np.float64), codes(feeds["v"].astype(np.float64), vs)], 2)
    for out, want in (("present_key_0", kq), ("present_value_0", vq)):
        assert got[out].dtype == code and got[out].shape == (1, 2, 8, 8)
        assert (got[out].astype(np.float64) == want).all()
    kf, vf = (np.repeat(t * s, 2, axis=1) for t, s in ((kq, ks), (vq, vs)))
    scores = feeds["q"].astype(np.float64) @ kf.swapaxes(-1, -2) * 0.35
    p = np.exp(scores - scores.max(-1, keepdims=True))
    y = (p / p.sum(-1, keepdims=True)) @ vf
    np.testing.assert_allclose(got["y0"], y, rtol=2e-3, atol=2e-3)
    assert got["plen"].tolist() == [1, 2, 5, 8]
    if kind == "int8":  # ORT's own optimizations (QDQ fusions included) leave the meaning intact
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(lower_model(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(["y0"], feeds)[0], got["y0"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=KINDS)
def kv_engine(request, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / f"kv-{request.param}.mmc"
    run_mmc("compile", tiny_dir, "--kv-cache", request.param, "-o", out, "-q")
    return request.param, out


def test_manifest_and_report(kv_engine):
    kind, out = kv_engine
    man = json.loads((out / "manifest.json").read_text())
    dec = man["components"]["decoder"]
    want = "int8" if kind == "int8" else "float8_e4m3fn"
    caches = [x for x in dec["inputs"] + dec["outputs"] if x["name"].startswith(("past_", "present_"))]
    assert len(caches) == 8 and all(x["dtype"] == want for x in caches)
    assert all(x["dtype"] == "float32" for x in man["components"]["vision"]["outputs"])
    q = man["quantization"]
    assert q["weights"] == "float" and q["kv_cache"] == kind
    kv = q["kv_cache_layers"]
    assert kv["layers"] == 2 and kv["bytes_per_token"] * 4 == kv["bytes_per_token_fp32"] > 0
    assert all(len(r["k_amax"]) == 2 and min(r["k_amax"] + r["v_amax"]) > 0 for r in kv["per_layer"])
    acc = q["accuracy"]
    assert acc["positions"] >= 200 and acc["logits_cosine_mean"] >= 0.999 and acc["top1_agreement"] >= 0.98
    assert ("session_config" in dec) == (kind == "fp8")  # ORT's QDQ fusions reject float8 (QLinearConcat)


def _logits_cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_decode_with_quantized_cache_follows_the_float_engine(kv_engine, engine_all, images):
    """Prefill an image prompt, then 16 decode steps fed the float engine's greedy tokens: the
    quantized engine's cache holds codes and grows by one position per step, and its logits
    stay with the float engine's at every step."""
    from mmc.runtime.engine import load

    kind, out = kv_engine
    ref, eng = load(engine_all, device="cpu"), load(out, device="cpu")
    _, embeds, pos, mask, next_pos = ref._prepare_batch(["Describe the picture."], [[images["odd"]]])
    lr, cr = ref.prefill(embeds, pos, mask)
    lq, cq = eng.prefill(embeds, pos, mask)
    prompt_len = mask.shape[1]
    cos, agree = [_logits_cosine(lr, lq)], [lr.argmax() == lq.argmax()]
    for step in range(16):
        key = cq["past_key_0"]
        assert key.data_type() == ("tensor(int8)" if kind == "int8" else "tensor(float8e4m3fn)")
        assert key.shape()[2] == prompt_len + step
        token = lr.argmax(-1)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        p = np.broadcast_to(next_pos[:, None], (3, 1, 1)).copy()
        lr, cr = ref.decode_one_token(token, p, mask, cr)
        lq, cq = eng.decode_one_token(token, p, mask, cq)
        next_pos = next_pos + 1
        cos.append(_logits_cosine(lr, lq))
        agree.append(lr.argmax() == lq.argmax())
    assert min(cos) >= 0.999, cos
    assert np.mean(agree) >= 15 / 17, agree
    text = eng.generate("The quick brown", max_new_tokens=8).text
    assert text == ref.generate("The quick brown", max_new_tokens=8).text, text  # the trained phrase survives
