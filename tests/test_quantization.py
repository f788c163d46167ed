"""Weight-only quantization: every quantize/dequantize/pack helper against a float64 reference,
Q/DQ placement on a hand-built graph (and what stays float), the ORT face (MatMulNBits, 8 and 4
bits, K not a multiple of the block) against x @ Ŵ, and `--int8` / `--int4` engines of the tiny
preset: weight bytes, the accuracy targets, generation, the report. W8A8, FP8, SmoothQuant and
calibration are in test_quantization_w8a8.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_mmc
from graphs import fvi, helper, model

from mmc import quantization as qz

rng = np.random.default_rng(11)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_against_float64(bits):
    w = rng.standard_normal((40, 24)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    q, s = qz.quantize_per_channel(w, bits)
    lo, hi = qz.qrange(bits)
    assert q.min() >= lo and q.max() <= hi and s.shape == (24,)
    ref_scale = np.abs(w.astype(np.float64)).max(0) / hi
    np.testing.assert_allclose(s[ref_scale > 0], ref_scale[ref_scale > 0], rtol=1e-6)
    w_hat = qz.dequantize(q, s).astype(np.float64)
    assert (np.abs(w_hat - w) <= s.astype(np.float64) / 2 * (1 + 1e-6)).all()  # round to nearest
    assert (w_hat[:, 3] == 0).all() and s[3] == 1.0


@pytest.mark.parametrize("k,group", [(256, 128), (200, 64), (40, 128)])
def test_blockwise_against_float64(k, group):
    w = rng.standard_normal((k, 8)).astype(np.float32)
    q, s = qz.quantize_blockwise(w, 4, group)
    assert s.shape == (-(-k // group), 8) and q.min() >= -8 and q.max() <= 7
    w_hat = qz.dequantize(q, s, group).astype(np.float64)
    for j in range(s.shape[0]):
        rows = slice(j * group, min(k, (j + 1) * group))
        ref = np.abs(w[rows].astype(np.float64)).max(0) / 7
        np.testing.assert_allclose(s[j], ref, rtol=1e-6)
        assert (np.abs(w_hat[rows] - w[rows]) <= s[j] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits,block,k", [(8, 64, 64), (8, 128, 100), (4, 128, 200), (4, 32, 64)])
def test_matmulnbits_face_matches_dequantized_gemm(bits, block, k):
    """Pack -> com.microsoft.MatMulNBits in ORT == x @ dequantize(q) (float64 reference)."""
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    w = rng.standard_normal((k, 16)).astype(np.float32)
    if bits == 8:
        q, s = qz.quantize_per_channel(w, 8)
        scales, w_hat = s.reshape(16, 1), qz.dequantize(q, s)
    else:
        q, s = qz.quantize_blockwise(w, 4, block)
        scales, w_hat = s.T.copy(), qz.dequantize(q, s, block)
    packed = qz.pack_matmulnbits(q, bits, block)
    assert packed.shape == (16, -(-k // block), block * bits // 8)
    node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=16, bits=bits,
                            block_size=block)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_hat.astype(np.float64), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qdq_placement_and_lowering(mode):
    """Two hidden GEMMs get DequantizeLinear weights; the logits GEMM (a graph output) stays
    float; lowered for ORT they run as MatMulNBits and compute x @ Ŵ."""
    from test_passes_golden import to_graph

    from mmc.lowering import lower_model
    from mmc.numerics import run_model
    from mmc.pass_manager import PassContext
    from mmc.registry import create

    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) for s in ((32, 64), (64, 32), (32, 50)))
    before = model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                    helper.make_node("MatMul", ["r", "w2"], ["h2"]), helper.make_node("MatMul", ["h2", "w3"], ["logits"])],
                   [fvi("x", ["b", 32])], [fvi("logits", ["b", 50])], [("w1", w1), ("w2", w2), ("w3", w3)])
    g = to_graph(before)
    ctx = PassContext("decoder", current_pass="quantize-weights",
                      options={"quant": qz.QuantConfig(mode, group_size=32, keep_float=("lm_head",))})
    r = create("quantize-weights").run(g, ctx)
    assert r.stats == {"quantized": 2, "kept-float": 1}
    assert [n.op for n in g.nodes].count("DequantizeLinear") == 2
    last = next(n for n in g.nodes if n.outputs[0].name == "logits")
    assert last.inputs[1].name == "w3"  # lm_head untouched
    from mmc.ir import to_model

    after = to_model(g)
    lowered = lower_model(after)
    assert [n.op_type for n in lowered.graph.node].count("MatMulNBits") == 2
    x = rng.standard_normal((4, 32)).astype(np.float32)
    if mode == "int8":
        deq = [qz.dequantize(*qz.quantize_per_channel(w, 8)) for w in (w1, w2)]
    else:
        deq = [qz.dequantize(*qz.quantize_blockwise(w, 4, 32), 32) for w in (w1, w2)]
    ref = np.maximum(x.astype(np.float64) @ deq[0], 0) @ deq[1] @ w3
    np.testing.assert_allclose(run_model(after, {"x": x})["logits"], ref, atol=1e-3, rtol=1e-3)
    layers = ctx.options["quant_layers"]["decoder"]
    assert sum("bits" in x for x in layers) == 2 and all(x["snr_db"] > 10 for x in layers if "bits" in x)


@pytest.mark.parametrize("flag,max_ratio", [("--int8", 0.30), ("--int4", 0.17)])
def test_quantized_engines_are_small_and_generate(flag, max_ratio, tiny_dir, tmp_path):
    out, dump = tmp_path / "q.mmc", tmp_path / "dump"
    run_mmc("compile", tiny_dir, flag, "--dump-dir", dump, "-o", out, "-q")
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["weight_bytes"]["ratio"] <= max_ratio
    assert any(k.startswith("lm_head") for k in q["weight_bytes"]["kept_float"])
    acc = q["accuracy"]
    assert acc["positions"] >= 200 and 0 < acc["logits_cosine_mean"] <= 1 and 0 <= acc["top1_agreement"] <= 1
    # the targets on the tiny preset: W8A16 cosine >= 0.999 and top-1 >= 99 %; W4A16 cosine >= 0.99
    if flag == "--int8":
        assert acc["logits_cosine_mean"] >= 0.999 and acc["top1_agreement"] >= 0.99
    else:
        assert acc["logits_cosine_mean"] >= 0.99
    dec = q["layers"]["decoder"]
    assert all(x["output_snr_db"] > 10 for x in dec if "bits" in x)  # per-layer output SNR is reported
    report = json.loads((dump / "report.json").read_text())
    assert report["quantization"]["accuracy"] == acc
    ops = json.loads((out / "manifest.json").read_text())["components"]["decoder"]["ops"]
    assert ops.get("com.microsoft.MatMulNBits", 0) >= 4  # per layer: qkv, o, gate/up, down
    proc = run_mmc("run", out, "--prompt", "Describe the picture.", "--max-new-tokens", "6", "--json")
    assert len(json.loads(proc.stdout)["token_ids"]) >= 1


def test_quantization_flags_are_checked(tiny_dir, tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": "an image", "image": "missing.png"}\n')
    for args, words in ((["--max-drop", "1"], "needs --int8"), (["--int4", "--group-size", "100"], "power of two"),
                        (["--int8", "w4a4"], "unknown quantization"), (["--int8", "--max-drop", "150"], "0 <= PCT"),
                        (["--calib", bad_jsonl], "needs --int8"), (["--quantize-lm-head"], "needs --int8"),
                        (["--fp8", "--target", "cuda"], "the cuda target has no fp8 GEMM"),
                        (["--int8", "w8a8", "--smooth-alpha", "2"], "--smooth-alpha"),
                        (["--int8", "--calib", bad_jsonl], "bad.jsonl:2: image"),
                        (["--int8", "--calib", tmp_path / "nope.jsonl"], "no such file")):
        proc = run_mmc("compile", tiny_dir, *args, "-o", tmp_path / "x.mmc", "-q", check_ok=False)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x.mmc").exists()


def test_weight_only_without_accuracy_report_skips_calibration(tiny_dir, tmp_path):
    """--no-accuracy-report: a weight-only engine compiles with no calibration run and no accuracy
    section (how multi-GB models are quantized without ONNX Runtime on the CPU); W8A8 still calibrates."""
    from mmc.api import compile_model

    r = compile_model(str(tiny_dir), output=tmp_path / "i8.mmc", quantize="int8", accuracy_report=False, progress=False)
    assert r.quantization["calibration"] is None and "accuracy" not in r.quantization
    assert not any(k.startswith("calibrating") for k in r.seconds)
    assert {"decoder: loading the exported graph", "decoder: quantize-weights", "writing engine"} <= set(r.seconds)
    assert r.quantization["weight_bytes"]["ratio"] < 0.3
    r = compile_model(str(tiny_dir), output=tmp_path / "w8a8.mmc", quantize="w8a8", accuracy_report=False, progress=False)
    assert r.quantization["calibration"] is not None and "accuracy" not in r.quantization
