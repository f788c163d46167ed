"""Golden tests for the pattern engine and the canonicalize pass: exact hits, must-not-fire
cases with their reasons, and outputs unchanged in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import fvi, helper, model, random_feeds, to_graph
from onnx import TensorProto

from mmc import registry
from mmc.numerics import run_model
from mmc.pass_manager import PassContext
from mmc.patterns import Miss, Op, Var, match
from mmc.verifier import verify

registry.load_builtin_passes()
F16, F32, F64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE


def canonicalize(m):
    g = to_graph(m)
    ctx = PassContext("t", current_pass="canonicalize")
    r = registry.create("canonicalize").run(g, ctx)
    after = verify(g)
    feeds = random_feeds(m, np.random.default_rng(0))
    ref, got = run_model(m, feeds), run_model(after, feeds)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    return g, r, ctx


def test_pattern_binding_commute_and_reasons():
    m = model([helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Add", ["sq", "y"], ["z"])],
              [fvi("x", [2]), fvi("y", [2])], [fvi("z", [2])])
    g = to_graph(m)
    add = g.nodes[1]
    hit = match(Op("Add", Var("y"), Op("Mul", Var("a"), Var("a")), commute=True), add)
    assert hit["a"].name == "x" and hit["y"].name == "y"
    with pytest.raises(Miss, match="found Mul"):
        match(Op("Add", Op("Sub", Var("a"), Var("b")), Var("y")), add)
    with pytest.raises(Miss, match="bound to"):
        match(Op("Add", Op("Mul", Var("a"), Var("a")), Var("a")), add)  # y is not x


def test_canonicalize_rewrites_each_spelling():
    m = model(
        [helper.make_node("Div", ["one", "x"], ["r"]),                           # -> Reciprocal
         helper.make_node("Cast", ["r"], ["same"], to=F32),                       # identity cast
         helper.make_node("Cast", ["same"], ["wide"], to=F64),
         helper.make_node("Cast", ["wide"], ["back"], to=F32),                    # exact round trip
         helper.make_node("Reshape", ["back", "s1"], ["r1"]),
         helper.make_node("Reshape", ["r1", "s2"], ["y"])],                       # chain
        [fvi("x", [2, 3])], [fvi("y", [6])],
        [("one", np.array(1.0, np.float32)), ("s1", np.array([3, 2])), ("s2", np.array([6]))])
    g, r, ctx = canonicalize(m)
    assert r.stats == {"div-one-to-reciprocal": 1, "identity-cast": 1, "cast-roundtrip": 1, "reshape-chain": 1}
    assert [n.op for n in g.nodes] == ["Reciprocal", "Reshape"]
    assert all(ctx.origins.get(n.name) == "canonicalize" for n in g.nodes)


def test_canonicalize_must_not_fire_and_says_why():
    m = model(
        [helper.make_node("Div", ["two", "x"], ["r"]),                            # numerator 2
         helper.make_node("Cast", ["r"], ["h"], to=F16),
         helper.make_node("Cast", ["h"], ["back"], to=F32),                       # lossy round trip
         helper.make_node("Reshape", ["back", "s1"], ["r1"]),
         helper.make_node("Reshape", ["r1", "s2"], ["y"])],                       # 0 in outer shape
        [fvi("x", [2, 3])], [fvi("y", [3, 2])],
        [("two", np.array(2.0, np.float32)), ("s1", np.array([3, 2])), ("s2", np.array([0, 2]))])
    g, r, ctx = canonicalize(m)
    assert not r.modified and sum(r.stats.values()) == 0 and len(g.nodes) == 5
    assert "numerator is not the constant 1" in ctx.near_misses["div-one-to-reciprocal"]["reason"]
    assert "loses information" in ctx.near_misses["cast-roundtrip"]["reason"]
    assert "0 entries" in ctx.near_misses["reshape-chain"]["reason"]
