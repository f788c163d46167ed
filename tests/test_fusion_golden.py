"""Golden tests for the fusion passes on hand-built graphs: exact rewrite counts per rule,
must-not-fire cases whose near miss names the reason, the verifier after every rewrite (mmc ops
inferred by their plugins, the lowered graph checked by ONNX), and outputs before == after in
ONNX Runtime (fused graphs run through their ORT faces)."""

from __future__ import annotations

import numpy as np
from graphs import fvi, helper, model
from test_passes_golden import apply, assert_same_outputs

from mmc.pass_manager import PassContext

H, D, N, KV = 16, 8, 4, 2
rng = np.random.default_rng(3)


def w(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def c(value, dtype=np.float32):
    return np.asarray(value, dtype=dtype)


def mmc_ops(g):
    return sorted(n.op for n in g.nodes if n.domain == "mmc")


def near_miss(name, m):
    from test_passes_golden import to_graph

    from mmc import registry

    ctx = PassContext("test", current_pass=name)
    result = registry.create(name).run(to_graph(m), ctx)
    return result, ctx.near_misses


# ---- fuse-norms --------------------------------------------------------------------------
def rms_graph(axes=(-1,), divide=False):
    tail = ([helper.make_node("Div", ["x", "s"], ["n"])] if divide else
            [helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["x", "r"], ["n"])])
    return model([helper.make_node("Pow", ["x", "two"], ["p"]), helper.make_node("ReduceMean", ["p", "axes"], ["m"]),
                  helper.make_node("Add", ["m", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]), *tail,
                  helper.make_node("Mul", ["wt", "n"], ["y"])],
                 [fvi("x", ["b", 3, H])], [fvi("y", ["b", 3, H])],
                 [("two", c(2.0)), ("axes", c(list(axes), np.int64)), ("eps", c(1e-6)), ("wt", w(H))])


def test_rms_norm_both_spellings():
    for divide in (False, True):
        before = rms_graph(divide=divide)
        g, r, after = apply("fuse-norms", before)
        assert r.stats["rms-norm"] == 1 and mmc_ops(g) == ["RMSNorm"] and len(g.nodes) == 1
        assert_same_outputs(before, after, b=2)


def test_rms_norm_over_wrong_axis_does_not_fire():
    r, misses = near_miss("fuse-norms", rms_graph(axes=(1,)))
    assert r.stats["rms-norm"] == 0
    assert "not the last axis" in misses["rms-norm"]["reason"]


def test_layer_norm_and_absorbed_scale():
    before = model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, epsilon=1e-5),
                    helper.make_node("Mul", ["n", "k"], ["y"])],
                   [fvi("x", ["b", 3, H])], [fvi("y", ["b", 3, H])], [("g", w(H)), ("b", w(H)), ("k", w(H))])
    g, r, after = apply("fuse-norms", before)
    assert r.stats["layer-norm"] == 1 and r.stats["absorb-scale"] == 1 and [n.op for n in g.nodes] == ["LayerNorm"]
    assert_same_outputs(before, after, b=2)


def test_layer_norm_not_over_last_axis_does_not_fire():
    m = model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=1, epsilon=1e-5)],
              [fvi("x", ["b", 3, H])], [fvi("y", ["b", 3, H])], [("g", w(3, H)), ("b", w(3, H))])
    r, misses = near_miss("fuse-norms", m)
    assert r.stats["layer-norm"] == 0 and "not only the last" in misses["layer-norm"]["reason"]


# ---- fuse-skip-norm ----------------------------------------------------------------------
def test_skip_norm_takes_the_residual_add():
    before = rms_graph()
    g0, _, mid = apply("fuse-norms", model(
        [helper.make_node("Add", ["x0", "x1"], ["x"]), *rms_graph().graph.node, helper.make_node("Add", ["x", "y"], ["z"])],
        [fvi("x0", ["b", 3, H]), fvi("x1", ["b", 3, H])], [fvi("z", ["b", 3, H])], [
            (i.name, np.frombuffer(i.raw_data, np.float32 if i.data_type == 1 else np.int64).reshape(i.dims))
            for i in before.graph.initializer]))
    g, r, after = apply("fuse-skip-norm", mid)
    assert r.stats["skip-rms-norm"] == 1 and mmc_ops(g) == ["SkipRMSNorm"] and len(g.nodes) == 2
    assert_same_outputs(mid, after, b=2)


def test_skip_norm_broadcast_add_does_not_fire():
    base = rms_graph()
    m = model([helper.make_node("Add", ["x0", "bias"], ["x"]), *base.graph.node],
              [fvi("x0", ["b", 3, H])], [fvi("y", ["b", 3, H])],
              [(i.name, np.frombuffer(i.raw_data, np.float32 if i.data_type == 1 else np.int64).reshape(i.dims))
               for i in base.graph.initializer] + [("bias", w(H))])
    _, _, mid = apply("fuse-norms", m)
    r, misses = near_miss("fuse-skip-norm", mid)
    assert r.stats["skip-rms-norm"] == 0 and "broadcasts" in misses["skip-rms-norm"]["reason"]


# ---- fuse-rotary -------------------------------------------------------------------------
def rotary_graph(split=D // 2):
    nodes = [helper.make_node("Concat", ["f", "f"], ["ff"], axis=-1),
             helper.make_node("Cos", ["ff"], ["cos"]), helper.make_node("Sin", ["ff"], ["sin"]),
             helper.make_node("Unsqueeze", ["cos", "one"], ["uc"]), helper.make_node("Unsqueeze", ["sin", "one"], ["us"]),
             helper.make_node("Slice", ["x", "zero", "half", "last"], ["lo"]),
             helper.make_node("Slice", ["x", "half", "big", "last"], ["hi"]),
             helper.make_node("Neg", ["hi"], ["nh"]), helper.make_node("Concat", ["nh", "lo"], ["rot"], axis=-1),
             helper.make_node("Mul", ["x", "uc"], ["a"]), helper.make_node("Mul", ["rot", "us"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    ints = {"one": [1], "zero": [0], "half": [split], "big": [2**62], "last": [-1]}
    return model(nodes, [fvi("x", ["b", N, "s", D]), fvi("f", ["b", "s", D // 2])], [fvi("y", ["b", N, "s", D])],
                 [(k, c(v, np.int64)) for k, v in ints.items()])


def test_rotary_fires_and_proves_equal_halves():
    before = rotary_graph()
    g, r, after = apply("fuse-rotary", before)
    assert r.stats["rotary"] == 1 and mmc_ops(g) == ["RotaryEmbedding"]
    node = next(n for n in g.nodes if n.domain == "mmc")
    assert node.attrs["halves_equal"] == 1 and node.attrs["layout"] == "bnsd"
    assert_same_outputs(before, after, b=2, s=5)


def test_rotary_with_uneven_split_does_not_fire():
    r, misses = near_miss("fuse-rotary", rotary_graph(split=3))
    assert r.stats["rotary"] == 0 and "in half" in misses["rotary"]["reason"]


# ---- fuse-attention ----------------------------------------------------------------------
def attention_graph(softmax_axis=-1, scale_is_input=False, repeat_heads=N, guard_other=False):
    nodes = [helper.make_node("Concat", ["past_k", "k"], ["pk"], axis=-2),
             helper.make_node("Concat", ["past_v", "v"], ["pv"], axis=-2)]
    for t in ("k", "v"):  # repeat_kv
        nodes += [helper.make_node("Unsqueeze", [f"p{t}", "two"], [f"u{t}"]),
                  helper.make_node("Shape", [f"u{t}"], [f"lead{t}"], end=2),
                  helper.make_node("Shape", [f"u{t}"], [f"tail{t}"], start=3),
                  helper.make_node("Concat", [f"lead{t}", "group", f"tail{t}"], [f"es{t}"], axis=0),
                  helper.make_node("Expand", [f"u{t}", f"es{t}"], [f"e{t}"]),
                  helper.make_node("Shape", [f"p{t}"], [f"b{t}"], end=1),
                  helper.make_node("Shape", [f"p{t}"], [f"td{t}"], start=2),
                  helper.make_node("Concat", [f"b{t}", "heads", f"td{t}"], [f"rs{t}"], axis=0),
                  helper.make_node("Reshape", [f"e{t}", f"rs{t}"], [f"r{t}"])]
    nodes += [helper.make_node("Transpose", ["rk"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "scale"], ["sc"]),
              helper.make_node("Add", ["sc", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["p"], axis=softmax_axis),
              helper.make_node("Softmax", ["qk"], ["p_other"], axis=-1),
              helper.make_node("IsNaN", ["p_other" if guard_other else "p"], ["nan"]),
              helper.make_node("Where", ["nan", "zero", "p"], ["pg"]),
              helper.make_node("MatMul", ["pg", "rv"], ["y"])]
    inputs = [fvi("q", ["b", N, "s", D]), fvi("k", ["b", KV, "s", D]), fvi("v", ["b", KV, "s", D]),
              fvi("past_k", ["b", KV, "p", D]), fvi("past_v", ["b", KV, "p", D]), fvi("mask", ["b", 1, "s", "t"])]
    inits = [("two", c([2], np.int64)), ("group", c([N // KV], np.int64)),
             ("heads", c([repeat_heads], np.int64)), ("zero", c(0.0))]
    if scale_is_input:
        inputs.append(fvi("scale", []))
    else:
        inits.append(("scale", c(D ** -0.5)))
    outputs = [fvi("y", ["b", N, "s", D]), fvi("pk", ["b", KV, "t", D]), fvi("pv", ["b", KV, "t", D])]
    return model(nodes, inputs, outputs, inits)


def test_attention_with_cache_and_repeat_kv():
    before = attention_graph()
    g, r, after = apply("fuse-attention", before)
    assert r.stats["attention"] == 1 and [n.op for n in g.nodes] == ["Attention"]
    node = g.nodes[0]
    assert len(node.inputs) == 6 and [o.name for o in node.outputs] == ["y", "pk", "pv"]
    assert node.attrs["num_heads"] == N and node.attrs["kv_heads"] == KV
    assert abs(node.attrs["scale"] - D ** -0.5) < 1e-7
    assert node.attrs["nan_to_zero"] == 1  # the mask is a graph input: not provably finite
    from graphs import random_feeds

    from mmc.numerics import run_model

    feeds = random_feeds(before, np.random.default_rng(0), b=2, s=3, p=4, t=7)
    feeds["mask"] = np.where(np.random.default_rng(1).random((2, 1, 3, 7)) < 0.8, 0, -1e9).astype(np.float32)
    ref, got = run_model(before, feeds), run_model(after, feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5)


def test_attention_softmax_over_wrong_axis_does_not_fire():
    r, misses = near_miss("fuse-attention", attention_graph(softmax_axis=2))
    assert r.stats["attention"] == 0 and "not the keys" in misses["attention"]["reason"]


def test_attention_with_a_wrong_repeat_kv_reshape_does_not_fire():
    """Reshape to [B, 1, N*T/..., D]: every query would see all kv heads' keys; not GQA."""
    r, misses = near_miss("fuse-attention", attention_graph(repeat_heads=1))
    assert r.stats["attention"] == 0 and "repeat_kv" in misses["attention"]["reason"]


def test_attention_whose_nan_guard_tests_another_softmax_does_not_fire():
    r, misses = near_miss("fuse-attention", attention_graph(guard_other=True))
    assert r.stats["attention"] == 0 and "NaN guard" in misses["attention"]["reason"]


def test_attention_with_runtime_scale_does_not_fire():
    r, misses = near_miss("fuse-attention", attention_graph(scale_is_input=True))
    assert r.stats["attention"] == 0 and "scale" in misses["attention"]["reason"]


def test_onnx_attention_with_is_causal_does_not_fire():
    """opset 23's is_causal=1 assumes a causal mask the mmc op does not (it takes its mask as
    an input): that node must stay."""
    g = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)], "t",
                          [fvi("q", ["b", N, "s", D]), fvi("k", ["b", N, "s", D]), fvi("v", ["b", N, "s", D])],
                          [fvi("y", ["b", N, "s", D])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    r, misses = near_miss("fuse-attention", m)
    assert r.stats["attention-onnx"] == 0 and "is_causal" in misses["attention-onnx"]["reason"]


# ---- fuse-swiglu + horizontal-gemm ---------------------------------------------------------
def mlp_graph(same_input_for_up=False):
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"]), helper.make_node("MatMul", ["x", "wu"], ["u"]),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["a"]),
             helper.make_node("Mul", ["a", "g" if same_input_for_up else "u"], ["h"]),
             helper.make_node("MatMul", ["h", "wd"], ["y"])]
    return model(nodes, [fvi("x", ["b", 3, H])], [fvi("y", ["b", 3, H])],
                 [("wg", w(H, 2 * H)), ("wu", w(H, 2 * H)), ("wd", w(2 * H, H))])


def test_swiglu_then_gate_up_merge_packs_the_op():
    before = mlp_graph()
    g, r, mid = apply("fuse-swiglu", before)
    assert r.stats["swiglu"] == 1 and mmc_ops(g) == ["SwiGLU"]
    g2, r2, after = apply("horizontal-gemm", mid)
    assert r2.stats == {"merge-qkv": 0, "merge-gate-up": 1, "merge-siblings": 0}
    assert [n.op for n in g2.nodes] == ["MatMul", "SwiGLU", "MatMul"]  # no Split: SwiGLU reads [gate | up]
    assert_same_outputs(before, after, b=2)


def test_x_times_silu_x_is_not_a_gated_mlp():
    r, misses = near_miss("fuse-swiglu", mlp_graph(same_input_for_up=True))
    assert r.stats["swiglu"] == 0 and "same tensor" in misses["swiglu"]["reason"]


def test_horizontal_gemm_merges_biased_siblings_of_unequal_width():
    nodes, inits = [], []
    for i, width in enumerate((H, H // 2, H // 2)):
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"])]
        inits += [(f"w{i}", w(H, width)), (f"b{i}", w(width))]
    before = model(nodes, [fvi("x", ["b", H])], [fvi(f"y{i}", ["b", wd]) for i, wd in enumerate((H, H // 2, H // 2))],
                   inits)
    g, r, after = apply("horizontal-gemm", before)
    assert r.stats["merge-siblings"] == 1 and [n.op for n in g.nodes] == ["MatMul", "Add", "Split"]
    assert_same_outputs(before, after, b=3)


def test_sibling_whose_weight_reads_another_sibling_is_not_merged():
    """Siblings with a data dependency: B's 'weight' is computed from A's output. Merging them
    into one GEMM would need B's weight before A runs; the pass must leave them apart."""
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"]),                   # [H, H] x [H, H]
             helper.make_node("MatMul", ["x", "a"], ["b"]),                    # weight = a (an activation)
             helper.make_node("MatMul", ["x", "wc"], ["cc"]),
             helper.make_node("Add", ["b", "cc"], ["y"])]
    before = model(nodes, [fvi("x", [H, H])], [fvi("y", [H, H])], [("wa", w(H, H)), ("wc", w(H, H))])
    g, r, after = apply("horizontal-gemm", before)
    assert r.stats["merge-siblings"] == 1  # a and cc merge ...
    merged = next(n for n in g.nodes if n.op == "MatMul" and n.inputs[1].name != "a" and len(n.outputs[0].outputs))
    assert merged.inputs[1].shape[-1] == 2 * H  # ... b (weight = a) is left as it was
    assert any(n.op == "MatMul" and n.inputs[1].name == "a" for n in g.nodes)
    assert_same_outputs(before, after)
    _, misses = near_miss("horizontal-gemm", model(nodes[:2] + [helper.make_node("Add", ["a", "b"], ["y"])],
                                                  [fvi("x", [H, H])], [fvi("y", [H, H])], [("wa", w(H, H))]))
    assert "not a constant" in misses["merge-siblings"]["reason"]


def test_cse_merges_commuted_twins():
    m = model([helper.make_node("Add", ["x", "m"], ["a"]), helper.make_node("Add", ["m", "x"], ["b"]),
               helper.make_node("Mul", ["a", "b"], ["y"])],
              [fvi("x", [2, 3]), fvi("m", [2, 3])], [fvi("y", [2, 3])])
    g, r, after = apply("cse", m)
    assert r.stats["duplicate-node"] == 1 and [n.op for n in g.nodes] == ["Add", "Mul"]
    assert_same_outputs(m, after)


def test_rms_norm_of_a_half_model_with_casts_to_fp32():
    """TorchScript spells a fp16 RMSNorm as Cast(x, fp32) -> core -> Cast(fp16) -> Mul(w)."""
    from onnx import TensorProto

    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Pow", ["xf", "two"], ["p"]), helper.make_node("ReduceMean", ["p", "axes"], ["m"]),
             helper.make_node("Add", ["m", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["xf", "r"], ["n"]),
             helper.make_node("Cast", ["n"], ["nh"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["wt", "nh"], ["y"])]
    half = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, ["b", H]) for n in ("x", "y")]
    before = model(nodes, [half[0]], [half[1]], [("two", c(2.0)), ("axes", c([-1], np.int64)), ("eps", c(1e-6)),
                                                 ("wt", w(H).astype(np.float16))])
    g, r, after = apply("fuse-norms", before)
    assert r.stats["rms-norm"] == 1 and [n.op for n in g.nodes] == ["RMSNorm"]
    assert np.dtype(g.nodes[0].inputs[0].dtype) == np.float16
    from mmc.numerics import run_model

    x = np.random.default_rng(0).standard_normal((3, H)).astype(np.float16)
    np.testing.assert_allclose(run_model(after, {"x": x})["y"].astype(np.float32),
                               run_model(before, {"x": x})["y"].astype(np.float32), atol=1e-2, rtol=1e-2)
