"""Every fused op's ORT face against its numpy reference, on fresh random inputs, for the
preferred face (opset 23: standard Attention/RotaryEmbedding) and the fallback decompositions
(opset 17/20), plus the op's own shape inference against what ORT produced."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh

from mmc.lowering import lower_graph
from mmc.plugins import OPS
from mmc.verifier import verify_model

NP2ONNX = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("bool"): TensorProto.BOOL, np.dtype("int8"): TensorProto.INT8,
           np.dtype(ml_dtypes.float8_e4m3fn): TensorProto.FLOAT8E4M3FN}


def run_fused(op: str, inputs: list, attrs: dict, n_out: int, opset: int, upgrade: bool = False):
    """One mmc node in a model at `opset`, lowered for ORT, run; returns (outputs, lowered ops)."""
    import onnx_graphsurgeon as gs

    from mmc.numerics import ort_feeds, session

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    outs = [f"out{i}" for i in range(n_out)]
    node = oh.make_node(op, names, outs, domain="mmc", **attrs)
    vis = [oh.make_tensor_value_info(n, NP2ONNX[a.dtype], a.shape) for n, a in zip(names, inputs) if a is not None]
    graph = oh.make_graph([node], "g", vis, [oh.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset), oh.make_opsetid("mmc", 1)])
    model.ir_version = 10
    g = gs.import_onnx(model)
    for t, (dtype, shape) in zip(g.nodes[0].outputs, OPS[op].infer(g.nodes[0])):  # the op's own inference
        t.dtype, t.shape = dtype, shape
    lowered = gs.export_onnx(lower_graph(g, upgrade=upgrade))
    if "SimplifiedLayerNormalization" not in {n.op_type for n in lowered.graph.node}:  # ORT-only op
        verify_model(lowered)
    sess = session(lowered)
    feeds = {n: a for n, a in zip(names, inputs) if a is not None}
    got = sess.run(None, ort_feeds(feeds))  # float8 travels as OrtValues, comes back as uint8 bits
    got = [o.view(ml_dtypes.float8_e4m3fn) if t.type.tensor_type.elem_type == TensorProto.FLOAT8E4M3FN else o
           for o, t in zip(got, lowered.graph.output)]
    return got, [n.op_type for n in lowered.graph.node]


def close(got, want, tol=2e-5):
    assert got.shape == want.shape
    assert not np.isnan(got).any() and not np.isnan(want).any()
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("opset", [17, 20, 23])
def test_norms(opset):
    x, skip, w, b, beta = randn(2, 5, 32), randn(2, 5, 32), randn(32), randn(32), randn(32)
    cases = [("RMSNorm", [x, w], 1), ("SkipRMSNorm", [x, skip, w, b], 2), ("SkipRMSNorm", [x, skip, w], 2),
             ("LayerNorm", [x, w, beta], 1), ("SkipLayerNorm", [x, skip, w, beta, b], 2)]
    for op, ins, n in cases:
        attrs = {"epsilon": 1e-5}
        got, ops = run_fused(op, ins, attrs, n, opset)
        want = OPS[op].reference(ins, attrs)
        for g, r in zip(got, want):
            close(g, r)


def test_linear_ort_face():
    """mmc.Linear (a cuda-plan op, W [N, K]) lowers to MatMul of the transposed W (+ Add) for ORT:
    the reference's values, which are x @ Wᵀ (+ b)."""
    x, w, b = randn(2, 5, 32), randn(24, 32), randn(24)
    close(OPS["Linear"].reference([x, w, b], {})[0], x @ w.T + b, 1e-5)
    for ins, want_ops in (([x, w, b], ["Transpose", "MatMul", "Add"]), ([x, w], ["Transpose", "MatMul"])):
        got, ops = run_fused("Linear", ins, {}, 1, 20)
        assert ops == want_ops
        close(got[0], OPS["Linear"].reference(ins, {})[0], 1e-5)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_swiglu(opset, activation):
    packed, gate, up = randn(3, 4, 16), randn(3, 4, 8), randn(3, 4, 8)
    for ins in ([packed], [gate, up]):
        got, _ = run_fused("SwiGLU", ins, {"activation": activation}, 1, opset)
        close(got[0], OPS["SwiGLU"].reference(ins, {"activation": activation})[0])


@pytest.mark.parametrize("opset,upgrade,expect_op", [(20, False, "Neg"), (20, True, "RotaryEmbedding")])
def test_rotary(opset, upgrade, expect_op):
    b, n, s, d = 2, 3, 5, 16
    x = randn(b, n, s, d)
    for rdim in (0, 8):
        r = rdim or d
        f = randn(b, s, r // 2)
        cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
        attrs = {"rotary_dim": rdim, "layout": "bnsd", "halves_equal": 1}
        got, ops = run_fused("RotaryEmbedding", [x, cos, sin], attrs, 1, opset, upgrade)
        assert expect_op in ops
        close(got[0], OPS["RotaryEmbedding"].reference([x, cos, sin], attrs)[0])
    # unequal halves (an M-RoPE table the pass could not prove): the decomposition, always
    cos, sin = np.cos(randn(b, s, d)), np.sin(randn(b, s, d))
    attrs = {"layout": "bnsd", "halves_equal": 0}
    got, ops = run_fused("RotaryEmbedding", [x, cos, sin], attrs, 1, opset, upgrade)
    assert "RotaryEmbedding" not in ops
    close(got[0], OPS["RotaryEmbedding"].reference([x, cos, sin], attrs)[0])
    # the vision tower's layout: x [S, N, D], tables [S, D]
    xs, cs = randn(7, 2, 8), randn(7, 8)
    attrs = {"layout": "snd"}
    got, _ = run_fused("RotaryEmbedding", [xs, np.cos(cs), np.sin(cs)], attrs, 1, opset, upgrade)
    close(got[0], OPS["RotaryEmbedding"].reference([xs, np.cos(cs), np.sin(cs)], attrs)[0])


def _masks(b, s, t):
    causal = np.tril(np.ones((s, t), dtype=bool), k=t - s)[None, None].repeat(b, 0)  # [B,1,S,T]
    causal[1, :, :, :2] = False  # left padding in row 1
    causal[1, :, :, -1] = True   # ... every query still sees one key (no fully masked row)
    additive = np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32)
    return causal, additive


@pytest.mark.parametrize("opset,upgrade,expect_op", [(20, False, "Softmax"), (20, True, "Attention")])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_attention(opset, upgrade, expect_op, heads):
    n, kv = heads
    b, s, p, d = 2, 3, 4, 8
    q, k, v = randn(b, n, s, d), randn(b, kv, s, d), randn(b, kv, s, d)
    pk, pv = randn(b, kv, p, d), randn(b, kv, p, d)
    for mask in _masks(b, s, p + s):
        for nan_to_zero in (0, 1):
            attrs = {"num_heads": n, "kv_heads": kv, "scale": 0.3, "nan_to_zero": nan_to_zero}
            ins = [q, k, v, pk, pv, mask]
            got, ops = run_fused("Attention", ins, attrs, 3, opset, upgrade)
            assert expect_op in ops
            for g, r in zip(got, OPS["Attention"].reference(ins, attrs)):
                close(g, r)
    # no cache, block-diagonal bool mask (the vision tower's windows)
    seg = np.array([0, 0, 0, 1, 1, 2])
    mask = (seg[:, None] == seg[None, :])[None, None]
    q1, k1, v1 = randn(1, n, 6, d), randn(1, kv, 6, d), randn(1, kv, 6, d)
    attrs = {"num_heads": n, "kv_heads": kv, "scale": 0.25, "nan_to_zero": 1}
    ins = [q1, k1, v1, None, None, mask]
    got, _ = run_fused("Attention", ins, attrs, 1, opset, upgrade)
    close(got[0], OPS["Attention"].reference(ins, attrs)[0])


@pytest.mark.parametrize("opset,upgrade", [(20, False), (20, True)])
@pytest.mark.parametrize("rot", [0, 4])
def test_attention_with_fused_rope(opset, upgrade, rot):
    """The fused-RoPE form (cos/sin as inputs 8, 9; made by the cuda plan rewrite) equals
    RotaryEmbedding of q and k, then the attention — in the numpy reference, the ORT face and the
    torch reference; the present key is the rotated one."""
    import torch

    n, kv, b, s, p, d = 4, 2, 2, 3, 4, 8
    q, k, v = randn(b, n, s, d), randn(b, kv, s, d), randn(b, kv, s, d)
    pk, pv = randn(b, kv, p, d), randn(b, kv, p, d)
    angle = randn(b, s, rot or d)
    cos, sin = np.cos(angle), np.sin(angle)
    mask = _masks(b, s, p + s)[1]
    attrs = {"num_heads": n, "kv_heads": kv, "scale": 0.3, "nan_to_zero": 1}
    rope = {"rotary_dim": rot, "layout": "bnsd"}
    rq, rk = (OPS["RotaryEmbedding"].reference([t, cos, sin], rope)[0] for t in (q, k))
    want = OPS["Attention"].reference([rq, rk, v, pk, pv, mask], attrs)
    fused = [q, k, v, pk, pv, mask, None, None, cos, sin]
    fattrs = {**attrs, "rotary_dim": rot}
    for g, r in zip(OPS["Attention"].reference(fused, fattrs), want):
        close(g, r, 1e-6)
    got, ops = run_fused("Attention", fused, fattrs, 3, opset, upgrade)
    assert "Neg" in ops  # the rotation's decomposition
    for g, r in zip(got, want):
        close(g, r)
    tins = [None if t is None else torch.from_numpy(t) for t in fused]
    for g, r in zip(OPS["Attention"].torch_reference(tins, fattrs), want):
        close(g.numpy(), r, 1e-5)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("upgrade", [False, True])  # the decomposition and the opset-23 Attention face
def test_attention_quantized_kv_cache(kind, upgrade):
    """kv_cache: this step's k/v are stored as per-head codes after the past codes, and the
    attention reads the dequantized cache. The face against the reference (codes equal, y
    close), and both against float attention on the unquantized cache (small, non-zero error)."""
    from mmc import quantization as qz

    n, kv, b, s, p, d = 4, 2, 2, 3, 5, 8
    q, k, v = randn(b, n, s, d), randn(b, kv, s, d), randn(b, kv, s, d)
    fk, fv = randn(b, kv, p, d) * 2, randn(b, kv, p, d)          # the float history
    ks = qz.kv_scale(np.abs(np.concatenate([fk, k], 2)).max((0, 2, 3)), kind)
    vs = qz.kv_scale(np.abs(np.concatenate([fv, v], 2)).max((0, 2, 3)), kind)
    pk, pv = qz.quantize_per_head(fk, ks, kind), qz.quantize_per_head(fv, vs, kind)
    mask = _masks(b, s, p + s)[0]
    attrs = {"num_heads": n, "kv_heads": kv, "scale": 0.35, "nan_to_zero": 1, "kv_cache": kind}
    ins = [q, k, v, pk, pv, mask, ks, vs]
    got, ops = run_fused("Attention", ins, attrs, 3, 20, upgrade)
    assert ("Attention" in ops) == upgrade and "QuantizeLinear" in ops
    ref = OPS["Attention"].reference(ins, attrs)
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == qz.kv_dtype(kind) and g.shape == (b, kv, p + s, d)
        assert (g[:, :, :p] == r[:, :, :p]).all()  # the past codes pass through untouched
        diff = np.abs(g.astype(np.float32) - r.astype(np.float32))
        step = 1 if kind == "int8" else np.abs(r.astype(np.float32)) / 8  # one code (fp8: 3 mantissa bits)
        assert (diff <= step + 1e-6).all() and (diff == 0).mean() > 0.99
    close(got[0], ref[0], tol=1e-4)
    exact = OPS["Attention"].reference([q, k, v, fk, fv, mask], {**attrs, "kv_cache": ""})[0]
    err = np.abs(ref[0].astype(np.float64) - exact).max()
    assert 0 < err < (0.03 if kind == "int8" else 0.15), err


def test_fully_masked_rows_stay_finite():
    """A left-padded prompt's pad rows see no key; the ORT face must not produce NaN there
    (a NaN K/V at a pad slot would poison later steps through 0 * NaN)."""
    n, kv, s, d = 2, 2, 3, 4
    q, k, v = randn(1, n, s, d), randn(1, kv, s, d), randn(1, kv, s, d)
    mask = np.tril(np.ones((s, s), dtype=bool))[None, None].copy()
    mask[..., 0, :] = False  # row 0 sees nothing
    attrs = {"num_heads": n, "kv_heads": kv, "scale": 0.5, "nan_to_zero": 1}
    for upgrade in (False, True):
        got, _ = run_fused("Attention", [q, k, v, None, None, mask], attrs, 1, 20, upgrade)
        assert np.isfinite(got[0]).all()
        ref = OPS["Attention"].reference([q, k, v, None, None, mask], attrs)[0]
        np.testing.assert_allclose(got[0][..., 1:, :], ref[..., 1:, :], atol=2e-5)


def test_shape_inference_matches_ort():
    import onnx_graphsurgeon as gs

    b, n, kv, s, p, d = 2, 4, 2, 3, 5, 8
    q = gs.Variable("q", np.float32, [b, n, s, d])
    k, v = gs.Variable("k", np.float32, [b, kv, s, d]), gs.Variable("v", np.float32, [b, kv, s, d])
    pk, pv = gs.Variable("pk", np.float32, [b, kv, p, d]), gs.Variable("pv", np.float32, [b, kv, p, d])
    node = gs.Node("Attention", inputs=[q, k, v, pk, pv], outputs=[gs.Variable("y"), gs.Variable("a"),
                                                                     gs.Variable("c")], domain="mmc")
    assert [shape for _, shape in OPS["Attention"].infer(node)] == [[b, n, s, d], [b, kv, p + s, d], [b, kv, p + s, d]]
    node.attrs["kv_cache"] = "int8"
    assert [t for t, _ in OPS["Attention"].infer(node)] == [np.dtype("float32"), np.dtype("int8"), np.dtype("int8")]
    packed = gs.Node("SwiGLU", inputs=[gs.Variable("x", np.float32, ["B", 5, 64])], outputs=[gs.Variable("y")],
                     domain="mmc")
    assert OPS["SwiGLU"].infer(packed) == [(np.dtype("float32"), ["B", 5, 32])]
    assert isinstance(onnx.__version__, str)
