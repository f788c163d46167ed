"""Target tensorrt without a GPU: TensorRT-RTX builds the tiny preset's engines (bf16, int8 and
more) through its ONNX parser with every mmc op as an mmc plugin; the plugins' build-time logic
(output types and shapes, format combinations, field serialization) op by op on the real
builder; the strongly typed precision lowering; and loading an engine where it cannot run.
TensorRT-RTX comes with the test extra (pip install -e ".[test]"); these tests do not skip."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import run_mmc

from mmc.errors import MmcError
from mmc.runtime.tensorrt import load_trt

trt, FLAVOUR = load_trt()  # an MmcError naming the package when the test extra is missing


@pytest.fixture(scope="module")
def engines(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    out = {}
    # the int8 engine also has small limits: every profile's opt must lie inside its range
    for mode, flags in (("bf16", []), ("int8", ["--int8", "--no-accuracy-report", "--max-seq-len", "64",
                                                "--max-batch", "2"])):
        out[mode] = root / f"tiny-trt-{mode}.mmc"
        run_mmc("compile", tiny_dir, "--passes", "all", "--target", "tensorrt", *flags, "-o", out[mode], "-q")
    return out


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_compile_builds_engines_with_every_mmc_op_a_plugin(engines, mode):
    man = json.loads((engines[mode] / "manifest.json").read_text())
    assert man["target"] == "tensorrt"
    info = man["target_info"]
    assert info["flavour"] == FLAVOUR and info["version"] == trt.__version__ and info["precision"] == "bf16"
    assert info["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0", "12.1"]
    for name in ("vision", "decoder"):
        comp = man["components"][name]
        blob = (engines[mode] / comp["engine"]).read_bytes()
        assert comp["engine"] in man["files"] and len(blob) > 10_000
        # every fused op of the optimized graph went through the parser as its plugin
        assert comp["plugins"] == {k.removeprefix("mmc."): v for k, v in comp["fused_ops"].items()}
        assert sum(comp["plugins"].values()) >= 5
        for op in comp["plugins"]:
            assert f"Mmc{op}".encode() in blob  # the engine names the plugin it needs at load
        assert comp["inputs"][0]["dtype"] == "bf16"
    dec = man["components"]["decoder"]
    assert dec["profiles"] == {"prefill": 0, "decode": 1}
    assert dec["profile_dims"]["decode"]["seq"] == [1, 1, 1] and dec["profile_dims"]["prefill"]["past"] == [0, 0, 0]
    limit = 64 if mode == "int8" else 2048
    assert dec["profile_dims"]["decode"]["total"][2] == limit
    for comp in man["components"].values():
        for dims in comp["profile_dims"].values():
            assert all(lo <= opt <= hi for lo, opt, hi in dims.values()), dims


def test_int8_engine_keeps_the_weights_quantized(engines):
    """The int8 decoder engine is smaller than the bf16 one by at least what storing the
    quantized GEMM weights as int8 codes instead of bf16 saves (TensorRT did not dequantize them
    into bf16 constants)."""
    sizes = {m: (engines[m] / "engines" / "decoder.engine").stat().st_size for m in engines}
    wb = json.loads((engines["int8"] / "manifest.json").read_text())["quantization"]["weight_bytes"]
    saved = wb["decoder_quantized_as_fp32"] / 2 - wb["decoder_quantized_as_fp32"] / 4  # bf16 -> int8
    assert sizes["bf16"] - sizes["int8"] >= 0.9 * saved > 0


def test_loading_where_it_cannot_run_is_one_clear_line(engines, tmp_path):
    """No GPU here: the error names the GPU the engine needs. A different TensorRT version in the
    manifest: the error names both versions. The CLI prints one line and exits 2."""
    from mmc.runtime import load

    with pytest.raises(MmcError, match=r"runs on an NVIDIA GPU of compute capability 8\.0, 8\.6.*no CUDA GPU"):
        load(engines["bf16"])
    man = json.loads((engines["bf16"] / "manifest.json").read_text())
    other = tmp_path / "other.mmc"
    import shutil

    shutil.copytree(engines["bf16"], other)
    man["target_info"]["version"] = "1.0.0"
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MmcError, match=rf"built with {FLAVOUR} 1\.0\.0, and {FLAVOUR} {trt.__version__} is installed"):
        load(other)
    r = run_mmc("run", engines["bf16"], "--prompt", "hi", check_ok=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no CUDA GPU" in r.stderr


def test_bad_capability_and_fp8_on_old_gpus_are_errors(tiny_dir, tmp_path):
    r = run_mmc("compile", tiny_dir, "--target", "tensorrt", "--trt-capability", "9.0", "-o", tmp_path / "a.mmc",
                "-q", check_ok=False)
    assert r.returncode == 2 and "cannot build for compute capability 9.0" in r.stderr
    r = run_mmc("compile", tiny_dir, "--target", "tensorrt", "--fp8", "--no-accuracy-report", "--trt-capability", "8.0",
                "-o", tmp_path / "b.mmc", "-q", check_ok=False)
    assert r.returncode == 2 and "fp8 engines need compute capability >= 8.9" in r.stderr
    assert not (tmp_path / "a.mmc").exists() and not (tmp_path / "b.mmc").exists()


# ---- the plugins' build-time logic, op by op on the real builder ---------------------------------
def _network_for(op: str, inputs, attrs: dict, out_types: list):
    from mmc.plugins.tensorrt import NAMESPACE, plugin_name, register
    from mmc.tensorrt import strongly_typed_network

    register(trt)
    ins = [gs.Variable(n, dtype=t, shape=s) for n, t, s in inputs]
    outs = [gs.Variable(f"y{i}", dtype=t) for i, t in enumerate(out_types)]
    node = gs.Node(plugin_name(op), "n", attrs | {"mmc_outputs": len(outs)}, ins, outs, domain=NAMESPACE)
    g = gs.Graph([node], ins, outs, opset=20,
                 import_domains=[onnx.helper.make_opsetid("", 20), onnx.helper.make_opsetid(NAMESPACE, 1)])
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    net = strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(net, logger)
    assert parser.parse(gs.export_onnx(g).SerializeToString()), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    blob = builder.build_serialized_network(net, config)
    outs = [(net.get_output(i).dtype, tuple(net.get_output(i).shape)) for i in range(net.num_outputs)]
    return outs, blob


BF16, F32, I8 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.INT8


@pytest.mark.parametrize("case", [
    ("RMSNorm", [("x", BF16, [2, 5, 64]), ("w", BF16, [64])], {"epsilon": 1e-6}, [[2, 5, 64]]),
    ("SkipRMSNorm", [("x", BF16, [2, 5, 64]), ("s", BF16, [2, 5, 64]), ("w", BF16, [64])],
     {"epsilon": 1e-6, "mmc_inputs": [0, 1, 2]}, [[2, 5, 64], [2, 5, 64]]),
    ("SwiGLU", [("gu", BF16, [2, 5, 96])], {"activation": "silu"}, [[2, 5, 48]]),
    ("SwiGLU", [("g", BF16, [2, 5, 48]), ("u", BF16, [2, 5, 48])], {"activation": "gelu_tanh"}, [[2, 5, 48]]),
    ("RotaryEmbedding", [("x", BF16, [1, 4, 5, 16]), ("c", BF16, [1, 5, 16]), ("s", BF16, [1, 5, 16])],
     {"rotary_dim": 0, "layout": "bnsd", "halves_equal": 1}, [[1, 4, 5, 16]]),
    ("Attention", [("q", BF16, [1, 4, 3, 16]), ("k", BF16, [1, 2, 3, 16]), ("v", BF16, [1, 2, 3, 16]),
                   ("pk", BF16, [1, 2, 7, 16]), ("pv", BF16, [1, 2, 7, 16]), ("m", onnx.TensorProto.BOOL, [1, 1, 3, 10])],
     {"num_heads": 4, "kv_heads": 2, "scale": 0.25, "nan_to_zero": 0, "mmc_inputs": [0, 1, 2, 3, 4, 5]},
     [[1, 4, 3, 16], [1, 2, 10, 16], [1, 2, 10, 16]]),
    ("Attention", [("q", BF16, [1, 4, 3, 16]), ("k", BF16, [1, 2, 3, 16]), ("v", BF16, [1, 2, 3, 16]),
                   ("m", BF16, [1, 1, 3, 3])],   # no cache (the vision tower): mask at position 5
     {"num_heads": 4, "kv_heads": 2, "scale": 0.25, "nan_to_zero": 1, "mmc_inputs": [0, 1, 2, 5]}, [[1, 4, 3, 16]]),
    ("Attention", [("q", BF16, [1, 4, 1, 16]), ("k", BF16, [1, 2, 1, 16]), ("v", BF16, [1, 2, 1, 16]),
                   ("pk", I8, [1, 2, 7, 16]), ("pv", I8, [1, 2, 7, 16]), ("ks", F32, [2]), ("vs", F32, [2])],
     {"num_heads": 4, "kv_heads": 2, "scale": 0.25, "nan_to_zero": 0, "kv_cache": "int8", "mmc_inputs": [0, 1, 2, 3, 4, 6, 7]},
     [[1, 4, 1, 16], [1, 2, 8, 16], [1, 2, 8, 16]]),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_plugin_output_types_and_shapes(case):
    op, inputs, attrs, shapes = case
    cache = I8 if attrs.get("kv_cache") == "int8" else BF16
    outs, blob = _network_for(op, inputs, attrs, [BF16] + [cache] * (len(shapes) - 1))
    assert blob is not None
    assert [s for _, s in outs] == [tuple(s) for s in shapes]
    want = [trt.DataType.BF16] + [trt.DataType.INT8 if cache == I8 else trt.DataType.BF16] * (len(shapes) - 1)
    assert [t for t, _ in outs] == want


def test_plugin_rejects_mixed_activation_types():
    """supports_format_combination: a float32 weight next to a bf16 activation has no format the
    plugin accepts, so a strongly typed build fails instead of converting silently."""
    outs, blob = _network_for("RMSNorm", [("x", BF16, [2, 5, 64]), ("w", F32, [64])], {"epsilon": 1e-6}, [BF16])
    assert blob is None


def test_format_combination_rules():
    from mmc.plugins.tensorrt import supports

    DT = trt.DataType
    attn = {"mmc_inputs": [0, 1, 2, 3, 4, 5], "mmc_outputs": 3}
    assert supports(trt, "Attention", attn, 0, [DT.BF16], 6)
    assert not supports(trt, "Attention", attn, 0, [DT.INT8], 6)
    assert not supports(trt, "Attention", attn, 1, [DT.BF16, DT.HALF], 6)           # k must match q
    assert supports(trt, "Attention", attn, 5, [DT.BF16] * 5 + [DT.BOOL], 6)        # a bool mask
    assert supports(trt, "Attention", attn, 5, [DT.BF16] * 6, 6)                    # or an additive one
    assert not supports(trt, "Attention", attn, 5, [DT.BF16] * 5 + [DT.FLOAT], 6)
    assert supports(trt, "Attention", attn, 7, [DT.BF16] * 8, 6)                    # present like past
    q = {"kv_cache": "int8", "mmc_inputs": [0, 1, 2, 3, 4, 6, 7], "mmc_outputs": 3}
    assert supports(trt, "Attention", q, 3, [DT.BF16] * 3 + [DT.INT8], 7)
    assert not supports(trt, "Attention", q, 3, [DT.BF16] * 4, 7)
    assert supports(trt, "Attention", q, 5, [DT.BF16] * 3 + [DT.INT8] * 2 + [DT.FLOAT], 7)   # k_scale float32
    assert not supports(trt, "Attention", q, 5, [DT.BF16] * 3 + [DT.INT8] * 2 + [DT.BF16], 7)
    assert supports(trt, "Attention", q, 8, [DT.BF16] * 3 + [DT.INT8] * 2 + [DT.FLOAT] * 2 + [DT.BF16, DT.INT8], 7)


@pytest.mark.parametrize("op", ["RMSNorm", "SwiGLU", "RotaryEmbedding", "Attention"])
def test_plugin_fields_round_trip(op):
    """The parser's fields -> the plugin -> get_fields_to_serialize -> a new plugin: same attrs."""
    from mmc.plugins.tensorrt import FIELDS, decode_fields, encode_fields, plugin_classes

    values = {"float": 0.125, "int": 3, "str": "int8"}
    attrs = {k: values[kind] for k, kind in FIELDS[op].items()} | {"mmc_inputs": [0, 1, 3], "mmc_outputs": 2}
    if op == "SwiGLU":
        attrs["activation"] = "gelu_tanh"
    fields, arrays = encode_fields(trt, op, attrs)
    plugin_cls, creator_cls = plugin_classes(trt)
    plugin = creator_cls(op).create_plugin("n", fields, trt.TensorRTPhase.BUILD)
    assert plugin.attrs == attrs and plugin.num_outputs == 2 and plugin.plugin_name == f"Mmc{op}"
    again = decode_fields(op, plugin.get_fields_to_serialize())
    assert again == attrs
    assert plugin.clone().attrs == attrs


# ---- strongly typed precision lowering -----------------------------------------------------
def test_precision_lowering_types_every_node_consistently():
    """bf16: activations and the weights read with them in bf16, a table computed from integers
    stays float32 and is cast where it meets an activation, a weight DQ's scale turns bf16, and
    the graph passes ONNX's strict type inference."""
    from mmc.precision import lower_precision

    x = gs.Variable("x", np.float32, ["n", 8])
    pos = gs.Variable("pos", np.int64, ["n"])
    w = gs.Constant("w", np.ones((8, 8), np.float32))
    codes, scale = gs.Constant("codes", np.ones((8, 8), np.int8)), gs.Constant("scale", np.full(8, 0.5, np.float32))
    posf, table, h, wq, y = (gs.Variable(n, np.float32) for n in ("posf", "table", "h", "wq", "y"))
    h2, y2 = gs.Variable("h2", np.float32), gs.Variable("y2", np.float32)
    pos_b, pos_f, y3 = gs.Variable("pos_b", np.bool_), gs.Variable("pos_f", np.float32), gs.Variable("y3", np.float32)
    y4 = gs.Variable("y4", np.float32)
    nodes = [gs.Node("Cast", "c", {"to": onnx.TensorProto.FLOAT}, [pos], [posf]),
             gs.Node("Unsqueeze", "u", {}, [posf, gs.Constant("ax", np.array([1], np.int64))], [table]),
             gs.Node("MatMul", "m", {}, [x, w], [h]),
             gs.Node("Mul", "mul", {}, [h, table], [h2]),
             gs.Node("DequantizeLinear", "dq", {"axis": 1}, [codes, scale], [wq]),
             gs.Node("MatMul", "m2", {}, [h2, wq], [y]),
             gs.Node("Cast", "up", {"to": onnx.TensorProto.FLOAT}, [y], [y2]),
             # a bool computed from an activation, cast to float and added to one
             gs.Node("IsNaN", "nan", {}, [y2], [pos_b]),
             gs.Node("Cast", "b2f", {"to": onnx.TensorProto.FLOAT}, [pos_b], [pos_f]),
             gs.Node("Add", "add", {}, [y2, pos_f], [y3]),
             gs.Node("Max", "floor", {}, [y3, gs.Constant("lowest", np.full(8, np.finfo(np.float32).min, np.float32))],
                     [y4])]
    g = gs.Graph(nodes, [x, pos], [y4], opset=21)
    stats = lower_precision(g, "bf16")
    assert stats["casts"] == 1 and stats["weights"] == 3
    m = onnx.shape_inference.infer_shapes(gs.export_onnx(g), strict_mode=True, check_type=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    assert types["x"] == types["h"] == types["y2"] == types["pos_f"] == types["y3"] == onnx.TensorProto.BFLOAT16
    assert types["table"] == onnx.TensorProto.FLOAT  # positions stay exact in float32
    inits = {t.name: t.data_type for t in m.graph.initializer}
    assert inits["w_bf16"] == inits["scale_bf16"] == onnx.TensorProto.BFLOAT16 and inits["codes"] == onnx.TensorProto.INT8
    lowest = next(t for t in m.graph.initializer if t.name == "lowest_bf16")
    assert np.isfinite(onnx.numpy_helper.to_array(lowest).astype(np.float32)).all()  # saturated, not -inf


# ---- the plugins' run-time computation (enqueue's core), on CPU tensors -------------------------
def test_run_plugin_computes_each_op_into_the_outputs():
    """run_plugin (what enqueue calls on TensorRT's wrapped pointers) fills the outputs with the
    op's reference values, inputs given as the node has them (absent positions dropped)."""
    import torch

    from mmc.plugins import OPS
    from mmc.plugins.tensorrt import run_plugin

    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    q, k, v, pk, pv = r(1, 4, 3, 16), r(1, 2, 3, 16), r(1, 2, 3, 16), r(1, 2, 5, 16), r(1, 2, 5, 16)
    mask = np.tril(np.ones((3, 8), dtype=bool), k=5)[None, None]
    attn = {"num_heads": 4, "kv_heads": 2, "scale": 0.25, "nan_to_zero": 0}
    cases = [
        ("RMSNorm", [r(2, 5, 32), r(32)], [0, 1], {"epsilon": 1e-6}),
        ("SkipRMSNorm", [r(2, 5, 32), r(2, 5, 32), r(32)], [0, 1, 2], {"epsilon": 1e-6}),
        ("SwiGLU", [r(2, 5, 48)], [0], {"activation": "silu"}),
        ("RotaryEmbedding", [r(1, 4, 5, 16), r(1, 5, 16), r(1, 5, 16)], [0, 1, 2],
         {"rotary_dim": 0, "layout": "bnsd", "halves_equal": 0}),
        ("Attention", [q, k, v, pk, pv, mask], [0, 1, 2, 3, 4, 5], attn),
        ("Attention", [q, k, v, np.ones((1, 1, 3, 3), bool)], [0, 1, 2, 5], attn),
    ]
    for op, ins, present, attrs in cases:
        full = [None] * (max(present) + 1)
        for i, a in zip(present, ins):
            full[i] = a
        want = OPS[op].reference(full, attrs)
        outs = [torch.empty(w.shape, dtype=torch.float32) for w in want]
        run_plugin(op, attrs | {"mmc_inputs": present, "mmc_outputs": len(want)}, [torch.from_numpy(a) for a in ins], outs)
        for got, w in zip(outs, want):
            np.testing.assert_allclose(got.numpy(), w, rtol=1e-4, atol=1e-5, err_msg=op)
