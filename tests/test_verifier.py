"""The verifier catches what a buggy pass leaves behind, naming the node."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest
from graphs import fvi, helper, model, to_graph

from mmc.verifier import VerifyError, verify


def chain():
    return to_graph(model([helper.make_node("Relu", ["x"], ["a"], name="r"),
                           helper.make_node("Neg", ["a"], ["y"], name="n")], [fvi("x", [2])], [fvi("y", [2])]))


def test_valid_graph_passes():
    verify(chain())


def test_out_of_order():
    g = chain()
    g.nodes.reverse()
    with pytest.raises(VerifyError, match="'n' reads 'a' which is produced later"):
        verify(g)


def test_dangling_value():
    g = chain()
    g.nodes[1].inputs[0] = gs.Variable("ghost", dtype="float32", shape=[2])
    with pytest.raises(VerifyError, match="reads 'ghost' which is dangling"):
        verify(g)


def test_type_mismatch_caught_by_shape_inference():
    import numpy as np

    g = chain()
    g.nodes[1].op = "Add"
    g.nodes[1].inputs.append(gs.Constant("i", np.array([1, 2], dtype=np.int64)))
    with pytest.raises(VerifyError, match="ONNX check failed"):
        verify(g)


def test_unproduced_output():
    g = chain()
    g.outputs = [gs.Variable("nothing", dtype="float32", shape=[2])]
    with pytest.raises(VerifyError, match="'nothing' is not produced"):
        verify(g)
