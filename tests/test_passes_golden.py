"""Golden tests for the built-in passes on hand-built graphs: exact rewrite counts, must-not-fire
cases, the verifier after each rewrite, and outputs before == after in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import fvi, helper, model, random_feeds, to_graph

from mmc import registry
from mmc.numerics import run_model
from mmc.pass_manager import PassContext
from mmc.verifier import verify

registry.load_builtin_passes()


def apply(name, m):
    g = to_graph(m)
    result = registry.create(name).run(g, PassContext("test", current_pass=name))
    after = verify(g, where=name)
    return g, result, after


def assert_same_outputs(before, after, **dims):
    feeds = random_feeds(before, np.random.default_rng(0), **dims)
    ref, got = run_model(before, feeds), run_model(after, feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6)


def ops(g):
    return [n.op for n in g.nodes]


# ---- cse ---------------------------------------------------------------------------------
def test_cse_merges_twins_and_duplicate_weights():
    w = np.arange(4, dtype=np.float32)
    m = model(
        [helper.make_node("Mul", ["x", "w1"], ["a"]), helper.make_node("Mul", ["x", "w2"], ["b"]),  # same weight bytes
         helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Relu", ["b"], ["rb"]),
         helper.make_node("Add", ["ra", "rb"], ["y"])],
        [fvi("x", ["n", 4])], [fvi("y", ["n", 4])], [("w1", w), ("w2", w.copy())])
    g, r, after = apply("cse", m)
    assert r.stats == {"duplicate-node": 2, "duplicate-weight": 1}
    assert ops(g) == ["Mul", "Relu", "Add"]
    assert_same_outputs(m, after, n=3)


def test_cse_must_not_fire_on_different_attrs_shapes_or_outputs():
    m = model(
        [helper.make_node("Softmax", ["x"], ["a"], axis=0), helper.make_node("Softmax", ["x"], ["b"], axis=1),
         helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("Mul", ["s", "c0"], ["y1"]), helper.make_node("Mul", ["s", "c1"], ["y2"]),
         helper.make_node("Neg", ["x"], ["n1"]), helper.make_node("Neg", ["x"], ["y3"])],  # y3 is a graph output
        [fvi("x", [2, 2])], [fvi("y1", [2, 2]), fvi("y2", [2, 2]), fvi("y3", [2, 2]), fvi("n1", [2, 2])],
        [("c0", np.array(1.0, np.float32)), ("c1", np.array([1.0], np.float32))])  # scalar vs [1]: different
    g, r, after = apply("cse", m)
    assert r.stats == {"duplicate-node": 0, "duplicate-weight": 0}
    assert not r.modified and len(g.nodes) == 7
    assert_same_outputs(m, after)


def test_cse_weights_alike_in_the_sampled_values_are_compared_in_full():
    """Big weights are grouped by a sample of their values first; two that agree there but
    differ elsewhere stay apart, equal ones merge."""
    w = np.random.default_rng(0).standard_normal((64, 640)).astype(np.float32)  # 40960 values: every 640th sampled
    near = w.copy()
    near[0, 1] += 1.0  # not a sampled position
    m = model([helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
               helper.make_node("MatMul", ["x", "w3"], ["c"]), helper.make_node("Sum", ["a", "b", "c"], ["y"])],
              [fvi("x", ["n", 64])], [fvi("y", ["n", 640])], [("w1", w), ("w2", near), ("w3", w.copy())])
    g, r, after = apply("cse", m)
    assert r.stats == {"duplicate-node": 1, "duplicate-weight": 1}
    assert_same_outputs(m, after, n=3)


def test_upgrade_opset_keeps_big_weights_without_serializing_them():
    """ir.upgrade_opset converts the graph with placeholders for big weights and gives the
    converted graph the very arrays back: same values, same outputs in ORT, new opset."""
    from mmc import ir

    w = np.random.default_rng(1).standard_normal((96, 256)).astype(np.float32)  # 96 KiB: stashed
    m = model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["r"]),
               helper.make_node("ReduceSum", ["r", "axes"], ["y"], keepdims=0)],
              [fvi("x", ["n", 96])], [fvi("y", ["n"])],
              [("w", w), ("shape", np.array([0, 16, 16], np.int64)), ("axes", np.array([1, 2], np.int64))],
              opset=17)
    g = to_graph(m)
    ir.upgrade_opset(g, 21)
    assert g.opset == 21
    consts = {t.name: t for t in g.tensors().values() if isinstance(t, ir.gs.Constant)}
    assert np.array_equal(consts["w"].values, w) and consts["w"].data_location is None
    assert_same_outputs(m, ir.to_model(g), n=3)


def test_cse_never_merges_random_ops():
    m = model([helper.make_node("RandomNormalLike", ["x"], ["a"]), helper.make_node("RandomNormalLike", ["x"], ["b"]),
               helper.make_node("Sub", ["a", "b"], ["y"])], [fvi("x", [2])], [fvi("y", [2])])
    _, r, _ = apply("cse", m)
    assert r.stats["duplicate-node"] == 0


# ---- dce ---------------------------------------------------------------------------------
def test_dce_removes_dead_nodes_and_bypasses_identity():
    m = model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["i"]),
               helper.make_node("Neg", ["i"], ["y"]), helper.make_node("Exp", ["x"], ["dead1"]),
               helper.make_node("Log", ["dead1"], ["dead2"]), helper.make_node("Identity", ["y"], ["z"])],
              [fvi("x", [3])], [fvi("z", [3])])
    g, r, after = apply("dce", m)
    assert r.stats == {"identity": 1, "dead-node": 2}
    assert ops(g) == ["Relu", "Neg", "Identity"]  # the Identity naming graph output z stays
    assert_same_outputs(m, after)


def test_dce_must_not_fire_on_a_live_graph():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", [3])], [fvi("y", [3])])
    g, r, _ = apply("dce", m)
    assert not r.modified and ops(g) == ["Relu"]


# ---- fold-constants ----------------------------------------------------------------------
def test_fold_constants_folds_weight_math_and_static_shapes():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = model(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),       # weight math: folds
         helper.make_node("Mul", ["wt", "two"], ["w2"]),                  # folds
         helper.make_node("MatMul", ["x", "w2"], ["h"]),                  # reads x: stays
         helper.make_node("Shape", ["w"], ["s"]),                         # static shape: folds
         helper.make_node("Reshape", ["h", "s"], ["y"])],                 # stays (reads h)
        [fvi("x", [3, 3])], [fvi("y", [2, 3])], [("w", w), ("two", np.array(2.0, np.float32))])
    g, r, after = apply("fold-constants", m)
    assert r.stats == {"constant-node": 0, "folded-node": 3}
    assert ops(g) == ["MatMul", "Reshape"]
    assert_same_outputs(m, after)


def test_fold_constants_must_not_fire_on_dynamic_inputs():
    m = model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
              [fvi("x", ["n", 4])], [fvi("y", ["n", 4])])
    g, r, _ = apply("fold-constants", m)
    assert not r.modified and ops(g) == ["Shape", "Reshape"]


# ---- on the real exported model -----------------------------------------------------------
@pytest.mark.parametrize("component", ["vision", "decoder"])
def test_pipeline_report_on_the_real_model(engine_all, component):
    """The compile fixture ran with --verify-each; its report shows every pass checked in ORT."""
    import json

    report = json.loads((engine_all.parent / "dump-all" / "report.json").read_text())
    recs = [r for r in report["passes"] if r["component"] == component]
    assert [r["name"] for r in recs] == registry.DEFAULT_PIPELINE
    for r in recs:
        assert r["check"]["within_tolerance"] and r["check"]["max_abs_err"] <= 1e-4
        assert r["nodes_after"] <= r["nodes_before"]
    assert sum(sum(r["rewrites"].values()) for r in recs) > 0  # the pipeline did real work
