"""W8A8 (SmoothQuant), FP8 and calibration: the helpers against float64 references, Q/DQ and
smoothing placement on a hand-built graph (smoothing exact, activation Q/DQ shared, the logits
GEMM untouched) executed by ONNX Runtime, JSONL calibration sets, and on the tiny preset with
injected activation-outlier channels: naive W8A8 misses the budget, SmoothQuant meets it, and
the budget search recovers the naive config by keeping named GEMMs in float."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from conftest import run_mmc
from graphs import fvi, helper, model

from mmc import quantization as qz
from mmc.calibration import Calibration, load_jsonl
from mmc.errors import MmcError

rng = np.random.default_rng(5)


def test_fp8_weights_against_float64():
    """Each fp8 code is the nearest e4m3fn value to w/s: error <= half a step at its binade."""
    w = (rng.standard_normal((48, 20)) * np.exp(rng.uniform(-4, 2, (48, 20)))).astype(np.float32)
    w[:, 3] = 0
    q, s = qz.quantize_fp8(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (20,)
    w64 = w.astype(np.float64)
    s_ref = np.abs(w64).max(0) / 448
    np.testing.assert_allclose(s[s_ref > 0], s_ref[s_ref > 0], rtol=1e-7)
    assert s[3] == 1 and (q[:, 3].astype(np.float32) == 0).all()
    y = np.abs(w64 / s.astype(np.float64))
    step = np.exp2(np.maximum(np.floor(np.log2(np.maximum(y, 2.0 ** -6))), -6) - 3)  # e4m3: 3 mantissa bits
    err = np.abs(qz.dequantize(q, s).astype(np.float64) - w64) / s.astype(np.float64)
    assert (err <= step / 2 + 1e-9).all() and np.abs(q.astype(np.float32)).max() <= 448


@pytest.mark.parametrize("kind", ["int8", "fp8e4m3"])
def test_activation_fake_quant_matches_onnx_runtime(kind):
    """fake_quantize (float64) == ORT's QuantizeLinear -> DequantizeLinear, saturation included."""
    x = (rng.standard_normal((6, 33)) * 3).astype(np.float32)
    scale = qz.activation_scale(float(np.abs(x).max()) * 0.5, kind)  # half the range: saturates
    zp = np.zeros((), np.int8) if kind == "int8" else np.zeros((), ml_dtypes.float8_e4m3fn)
    m = model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
               helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
              [fvi("x", [6, 33])], [fvi("y", [6, 33])], [("s", np.asarray(scale, np.float32)), ("zp", zp)])
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = qz.fake_quantize(x, scale, kind)
    np.testing.assert_array_equal(got, ref)
    top = 128 if kind == "int8" else 448  # int8 saturates at -128 and 127
    assert np.abs(ref).max() <= top * scale * (1 + 1e-6)


def test_smoothing_factors_against_float64():
    from mmc.passes.smooth_quant import smoothing_factors

    a = np.abs(rng.standard_normal(16)) * 10
    a[2] = 0
    ws = [rng.standard_normal((16, 8)), rng.standard_normal((16, 4)) * 3]
    for alpha in (0.0, 0.5, 0.8):
        s = smoothing_factors(a, ws, alpha)
        wmax = np.maximum(np.abs(ws[0]).max(1), np.abs(ws[1]).max(1))
        ref = a ** alpha / wmax ** (1 - alpha)
        np.testing.assert_allclose(s[a > 0], ref[a > 0], rtol=1e-12)
        assert s[2] == 1.0


def _toy():
    """x -> Mul(x, @g) -> h; h feeds two GEMMs (w1, w2); Add, Relu, then the logits GEMM (w3)."""
    g = np.ones(32, np.float32)
    g[[4, 9]] = 40.0  # outlier channels of h
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) * 0.2 for s in ((32, 24), (32, 24), (24, 10)))
    m = model([helper.make_node("Mul", ["x", "g"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["a"]),
               helper.make_node("MatMul", ["h", "w2"], ["b"]), helper.make_node("Add", ["a", "b"], ["c"]),
               helper.make_node("Relu", ["c"], ["r"]), helper.make_node("MatMul", ["r", "w3"], ["logits"])],
              [fvi("x", ["n", 32])], [fvi("logits", ["n", 10])], [("g", g), ("w1", w1), ("w2", w2), ("w3", w3)])
    feeds = [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(3)]
    return m, feeds


@pytest.mark.parametrize("mode", ["w8a8", "fp8"])
def test_w8a8_placement_and_numerics(mode):
    from test_passes_golden import to_graph

    from mmc.ir import to_model
    from mmc.numerics import run_model
    from mmc.pass_manager import PassContext
    from mmc.registry import create

    m, feeds = _toy()
    g = to_graph(m)
    cfg = qz.QuantConfig(mode, keep_float=("lm_head",), smooth_alpha=0.5 if mode == "w8a8" else None)
    ctx = PassContext("decoder", options={"quant": cfg, "calibration": Calibration("test", {"decoder": feeds}, [])})
    before = to_model(g)
    if mode == "w8a8":
        ctx.current_pass = "smooth-quant"
        assert create("smooth-quant").run(g, ctx).stats == {"smoothed": 1}
        rec = ctx.options["smoothing"]["decoder"][0]
        assert rec["outlier_ratio_before"] > 20 and rec["outlier_ratio_after"] < rec["outlier_ratio_before"] / 4
        smoothed = to_model(g)
        for f in feeds:  # smoothing is exact
            np.testing.assert_allclose(run_model(smoothed, f)["logits"], run_model(before, f)["logits"],
                                       rtol=1e-5, atol=1e-5)
    for name in ("quantize-weights", "quantize-activations"):
        ctx.current_pass = name
        create(name).run(g, ctx)
    ops = [n.op for n in g.nodes]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 3  # h shared; w1, w2
    q = next(n for n in g.nodes if n.op == "QuantizeLinear")
    assert q.inputs[0].name == "h" and len(q.outputs[0].outputs[0].outputs[0].outputs) == 2
    last = next(n for n in g.nodes if n.outputs[0].name == "logits")
    assert last.inputs[1].name == "w3" and last.inputs[0].name == "r"  # logits GEMM: float weight and input
    # float64 reference of what the graph means
    kind = cfg.activations
    gam = np.asarray(next(n for n in g.nodes if n.op == "Mul").inputs[1].values, np.float64)
    mm = [n for n in g.nodes if n.op == "MatMul" and n is not last]
    wq = [(np.asarray(n.inputs[1].inputs[0].inputs[0].values), np.asarray(n.inputs[1].inputs[0].inputs[1].values))
          for n in mm]
    scale = float(np.asarray(q.inputs[1].values))
    amax = max(np.abs(f["x"].astype(np.float64) * gam).max() for f in feeds)
    np.testing.assert_allclose(scale, qz.activation_scale(amax, kind), rtol=1e-6)
    after = to_model(g)
    for f in feeds:
        h = qz.fake_quantize((f["x"] * gam.astype(np.float32)).astype(np.float32), scale, kind).astype(np.float64)
        c = sum(h @ qz.dequantize(*w).astype(np.float64) for w in wq)
        ref = np.maximum(c, 0) @ np.asarray(last.inputs[1].values, np.float64)
        np.testing.assert_allclose(run_model(after, f)["logits"], ref, rtol=1e-4, atol=1e-4)
        if mode == "w8a8":  # ORT's own QDQ fusion (MatMulIntegerToFloat) computes the same
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            got = ort.InferenceSession(after.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"]).run(None, f)[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_calibration_jsonl(tmp_path, images):
    import shutil

    shutil.copy(images["small"], tmp_path / "a.png")
    f = tmp_path / "cal.jsonl"
    f.write_text('{"text": "What is this?", "image": "a.png"}\n\n{"text": "Plain text."}\n')
    s = load_jsonl(f)
    assert [x.text for x in s] == ["What is this?", "Plain text."] and s[0].images == [str(tmp_path / "a.png")]
    for body, words in (("not json\n", ":1: not JSON"), ('{"image": "a.png"}\n', ':1: each line'),
                        ('{"text": "x", "images": "a.png"}\n', ":1: \"image\""), ("\n", "no samples"),
                        ('{"text": "x"}\n{"text": "y", "image": "b.png"}\n', ":2: image")):
        f.write_text(body)
        with pytest.raises(MmcError, match=words):
            load_jsonl(f)


def test_calib_file_drives_calibration_and_the_report(tiny_dir, images, tmp_path):
    f = tmp_path / "cal.jsonl"
    f.write_text(json.dumps({"text": "Describe the image.", "image": str(images["odd"])}) + "\n"
                 + json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    out = tmp_path / "cal.mmc"
    run_mmc("compile", tiny_dir, "--int8", "w8a8", "--calib", f, "--calib-method", "percentile", "-o", out, "-q")
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    c = q["calibration"]
    assert c["source"] == str(f) and c["method"] == "percentile" and c["percentile"] == 99.99
    assert c["decoder_feed_sets"] == 2 and c["vision_feed_sets"] == 1
    assert q["accuracy"]["positions"] == c["decoder_positions"] > 20
    assert q["activations"] == "int8" and q["smoothing"]["decoder"]
    dec = [x for x in q["layers"]["decoder"] if "bits" in x]
    assert all(x["activations"] == "int8" and 0 < x["act_amax"] <= x["act_absmax"] for x in dec)
    assert any(x["act_amax"] < x["act_absmax"] for x in dec)  # the percentile clips
    proc = run_mmc("run", out, "--prompt", "Describe the picture.", "--image", images["odd"],
                   "--max-new-tokens", "4", "--json")
    assert json.loads(proc.stdout)["token_ids"]


def test_fp8_engine_generates(tiny_dir, tmp_path):
    out = tmp_path / "fp8.mmc"
    run_mmc("compile", tiny_dir, "--fp8", "-o", out, "-q")
    man = json.loads((out / "manifest.json").read_text())
    q = man["quantization"]
    assert q["weights"] == "fp8e4m3" and q["activations"] == "fp8e4m3" and q["weight_bytes"]["ratio"] <= 0.30
    assert q["accuracy"]["logits_cosine_mean"] >= 0.999
    assert man["components"]["decoder"]["session_config"] == {"session.disable_quant_qdq": "1"}
    assert man["components"]["decoder"]["ops"]["QuantizeLinear"] >= 4
    proc = run_mmc("run", out, "--prompt", "The quick brown", "--max-new-tokens", "4", "--json")
    assert json.loads(proc.stdout)["token_ids"]


@pytest.fixture(scope="module")
def outlier_dir(tiny_dir, tmp_path_factory):
    from lm_checkpoints import inject_outliers

    return inject_outliers(tiny_dir, tmp_path_factory.mktemp("outliers") / "tiny-outliers")


def _compile(src, out, *flags) -> dict:
    run_mmc("compile", src, "--int8", "w8a8", *flags, "-o", out, "-q")
    return json.loads((out / "manifest.json").read_text())["quantization"]


def test_smoothquant_meets_the_budget_naive_w8a8_misses(outlier_dir, tmp_path):
    """Budget: top-1 agreement >= 95 % (--max-drop 5). Outlier channels 100x: per-tensor int8
    activations without smoothing miss it; SmoothQuant (alpha 0.5) meets it."""
    naive = _compile(outlier_dir, tmp_path / "naive.mmc", "--no-smooth")
    smooth = _compile(outlier_dir, tmp_path / "smooth.mmc")
    assert naive["smoothquant_alpha"] is None and "smoothing" not in naive
    assert naive["accuracy"]["top1_agreement"] < 0.95 and naive["accuracy"]["logits_cosine_mean"] < 0.99
    rec = smooth["smoothing"]["decoder"]
    assert max(r["outlier_ratio_before"] for r in rec) > 50 and max(r["outlier_ratio_after"] for r in rec) < 5
    assert smooth["accuracy"]["top1_agreement"] >= 0.95 and smooth["accuracy"]["logits_cosine_mean"] >= 0.999


def test_budget_search_recovers_naive_w8a8(outlier_dir, tmp_path):
    """The failing naive config with --max-drop 5: the search keeps the most harmful GEMMs in
    float (named in the report) until the budget holds; the engine generates."""
    out = tmp_path / "budget.mmc"
    q = _compile(outlier_dir, out, "--no-smooth", "--max-drop", "5")
    b = q["budget"]
    assert b["met"] and b["min_top1"] == 0.95 and 1 <= len(b["kept_float"]) < 8
    assert q["accuracy"]["top1_agreement"] >= 0.95
    kept = [x["node"] for x in q["layers"]["decoder"] if x.get("kept_float") == "budget"]
    assert sorted(kept) == sorted(b["kept_float"])
    assert sum(k.startswith("budget") for k in q["weight_bytes"]["kept_float"]) == len(kept)
    ops = json.loads((out / "manifest.json").read_text())["components"]["decoder"]["ops"]
    assert ops["QuantizeLinear"] + len(kept) == 8  # one activation Q/DQ per quantized GEMM here
    proc = run_mmc("run", out, "--prompt", "The quick brown", "--max-new-tokens", "4", "--json")
    assert json.loads(proc.stdout)["token_ids"]
