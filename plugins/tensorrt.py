"""mmc's fused ops as TensorRT plugins (IPluginV3), one creator per op, namespace "mmc".

TensorRT's ONNX parser turns a node into a plugin layer when its op type names a registered
creator (its domain naming the namespace) and it has no importer of its own for that op type:
the parser takes "Attention" and "RotaryEmbedding" as ONNX's ops whatever the domain, so the
plugins are named `Mmc<Op>` (plugin_name) and the TensorRT lowering renames the nodes to match.
The node's attributes become the creator's fields. What a plugin
decides at build time is declared here, per op, from the op's spec (plugins/<op>/__init__.py):

    ROLES       what each input position carries: "act" (the activation dtype, input 0's),
                "mask" (bool, or the activation dtype), "cache" (the activation dtype, or int8 /
                float8 with the op's kv_cache attribute), "scale" (float32)
    FIELDS      the op's attributes and their field types (float -> FLOAT32, int -> INT32, str
                -> CHAR), plus two the TensorRT lowering adds: `mmc_inputs` (the op's input
                positions present in this node; TensorRT has no empty optional inputs) and
                `mmc_outputs` (how many outputs the node has)
    shapes      output dims as expressions of the input dims (TensorRT's IExprBuilder)

`MmcPlugin` implements the build-time interface (output types and shapes, format combinations,
configure, field serialization, clone) generically from those tables. At run time `enqueue`
wraps TensorRT's device pointers as torch tensors (`__cuda_array_interface__`), and `run_plugin`
computes the op with the cuda target's kernels (the Triton kernel where there is one, else the
torch path, exactly as the cuda executor runs the op) on TensorRT's stream and writes the
results into TensorRT's outputs. `run_plugin` is tested on CPU tensors; `enqueue` itself has not
run anywhere: no GPU reachable here runs a TensorRT engine with plugins (TensorRT-RTX does not
run on Hopper, full TensorRT is not installable). `register(trt)` registers every creator with
the module's plugin registry (the builder and a runtime both need it).
"""

from __future__ import annotations

import contextlib

import numpy as np

NAMESPACE = "mmc"
VERSION = "1"
PREFIX = "Mmc"


def plugin_name(op: str) -> str:
    return PREFIX + op


ROLES = {
    "RMSNorm": ("act", "act"),                                   # x, weight
    "SkipRMSNorm": ("act", "act", "act", "act"),                 # x, skip, weight, bias
    "LayerNorm": ("act", "act", "act"),                          # x, weight, bias
    "SkipLayerNorm": ("act", "act", "act", "act", "act"),        # x, skip, weight, beta, bias
    "SwiGLU": ("act", "act"),                                    # gate_up | gate, up
    "RotaryEmbedding": ("act", "act", "act"),                    # x, cos, sin (tables in x's dtype)
    "Attention": ("act", "act", "act", "cache", "cache", "mask", "scale", "scale"),
}
FLOAT, INT, STR = "float", "int", "str"
FIELDS = {
    "RMSNorm": {"epsilon": FLOAT},
    "SkipRMSNorm": {"epsilon": FLOAT},
    "LayerNorm": {"epsilon": FLOAT},
    "SkipLayerNorm": {"epsilon": FLOAT},
    "SwiGLU": {"activation": STR},
    "RotaryEmbedding": {"rotary_dim": INT, "layout": STR, "halves_equal": INT},
    "Attention": {"num_heads": INT, "kv_heads": INT, "scale": FLOAT, "nan_to_zero": INT, "kv_cache": STR},
}
LOWERING_FIELDS = {"mmc_inputs": INT, "mmc_outputs": INT}


def _field_type(trt, kind: str):
    return {FLOAT: trt.PluginFieldType.FLOAT32, INT: trt.PluginFieldType.INT32, STR: trt.PluginFieldType.CHAR}[kind]


def encode_fields(trt, op: str, attrs: dict):
    """The attrs as a PluginFieldCollection (int32 / float32 arrays, a string's bytes) and the
    arrays behind it: a PluginField points into its array, so the caller keeps them alive while
    TensorRT reads the fields."""
    kinds = FIELDS[op] | LOWERING_FIELDS
    arrays, fields = [], []
    for name, value in attrs.items():
        if name not in kinds:
            continue
        kind = kinds[name]
        if kind == STR:
            data = np.frombuffer(str(value).encode(), dtype=np.int8).copy()
        elif kind == INT:
            data = np.atleast_1d(np.asarray(value, dtype=np.int32)).copy()
        else:
            data = np.atleast_1d(np.asarray(value, dtype=np.float32)).copy()
        arrays.append(data)
        fields.append(trt.PluginField(name, data, _field_type(trt, kind)))
    return trt.PluginFieldCollection(fields), arrays


def decode_fields(op: str, fields) -> dict:
    """A PluginFieldCollection (as the parser or a deserialized engine gives it) -> attrs dict.
    Scalars come back as Python scalars, `mmc_inputs` as a list."""
    kinds = FIELDS[op] | LOWERING_FIELDS
    attrs = {}
    for f in fields:
        if f.name not in kinds:
            continue
        data = np.asarray(f.data)
        kind = kinds[f.name]
        if kind == STR:
            attrs[f.name] = data.astype(np.uint8).tobytes().decode().rstrip("\0")
        elif f.name == "mmc_inputs":
            attrs[f.name] = [int(v) for v in data.reshape(-1)]
        else:
            v = data.reshape(-1)[0]
            attrs[f.name] = int(v) if kind == INT else float(v)
    return attrs


def present_inputs(attrs: dict, n: int) -> list[int]:
    """The op's input positions the node has (all n when the lowering recorded none)."""
    return attrs.get("mmc_inputs", list(range(n)))


def output_dtypes(trt, op: str, attrs: dict, input_types: list) -> list:
    """Each output's DataType from the inputs' (positions as present in the node)."""
    n = attrs.get("mmc_outputs", 1)
    if op != "Attention":
        return [input_types[0]] * n
    at = {orig: i for i, orig in enumerate(present_inputs(attrs, len(input_types)))}
    cache = input_types[at[3]] if 3 in at else input_types[at[1]]
    return [input_types[0]] + [cache] * (n - 1)


def output_shapes(trt, op: str, attrs: dict, inputs: list, builder) -> list:
    """Each output's DimsExprs from the inputs' (positions as present in the node)."""
    n = attrs.get("mmc_outputs", 1)
    x = trt.DimsExprs(inputs[0])
    if op == "SwiGLU" and len(inputs) == 1:  # [..., 2I] -> [..., I]
        x[len(x) - 1] = builder.operation(trt.DimensionOperation.FLOOR_DIV, inputs[0][len(x) - 1], builder.constant(2))
    if op != "Attention":
        return [x] * n
    at = {orig: i for i, orig in enumerate(present_inputs(attrs, len(inputs)))}
    kv = trt.DimsExprs(inputs[at[1]])
    if 3 in at:  # present = cat(past, new) on the sequence axis
        kv[2] = builder.operation(trt.DimensionOperation.SUM, inputs[at[3]][2], inputs[at[1]][2])
    return [x] + [kv] * (n - 1)


def supports(trt, op: str, attrs: dict, pos: int, types: list, n_inputs: int) -> bool:
    """Whether the dtype at `pos` (inputs then outputs) fits the op, given those before it
    (TensorRT asks position by position; `types` holds the candidates up to `pos`)."""
    DT = trt.DataType
    floats = (DT.FLOAT, DT.HALF, DT.BF16)
    t = types[pos]
    if pos == 0:
        return t in floats
    act = types[0]
    if pos >= n_inputs:
        ins = list(types[:n_inputs])
        return t == output_dtypes(trt, op, attrs, ins)[pos - n_inputs]
    role = ROLES[op][present_inputs(attrs, n_inputs)[pos]]
    if role == "act":
        return t == act
    if role == "mask":
        return t in (DT.BOOL, act)
    if role == "scale":
        return t == DT.FLOAT
    codes = {"int8": DT.INT8, "fp8": getattr(DT, "FP8", None)}.get(attrs.get("kv_cache", ""))
    return t == (codes if codes is not None else act)


def plugin_classes(trt):
    """(MmcPlugin, MmcPluginCreator) built on the given TensorRT module's interfaces."""

    class MmcPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op: str, attrs: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.op, self.attrs, self.phase = op, dict(attrs), phase
            self.plugin_name, self.plugin_namespace, self.plugin_version = plugin_name(op), NAMESPACE, VERSION
            self.num_outputs = int(self.attrs.get("mmc_outputs", 1))
            self.timing_cache_id = ""

        def get_capability_interface(self, kind):
            return self

        def get_output_data_types(self, input_types):
            return output_dtypes(trt, self.op, self.attrs, list(input_types))

        def get_output_shapes(self, inputs, shape_inputs, builder):
            return output_shapes(trt, self.op, self.attrs, list(inputs), builder)

        def supports_format_combination(self, pos, in_out, num_inputs):
            if in_out[pos].desc.format != trt.TensorFormat.LINEAR:
                return False
            return supports(trt, self.op, self.attrs, pos, [d.desc.type for d in in_out[:pos + 1]], num_inputs)

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_fields_to_serialize(self):
            fields, self._field_arrays = encode_fields(trt, self.op, self.attrs)
            return fields

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def clone(self):
            return MmcPlugin(self.op, self.attrs, self.phase)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            ins = [device_tensor(trt, ptr, d) for ptr, d in zip(inputs, input_desc)]
            outs = [device_tensor(trt, ptr, d) for ptr, d in zip(outputs, output_desc)]
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                run_plugin(self.op, self.attrs, ins, outs)
            return 0

    class MmcPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, op: str):
            trt.IPluginCreatorV3One.__init__(self)
            self.op = op
            self.name, self.plugin_namespace, self.plugin_version = plugin_name(op), NAMESPACE, VERSION
            kinds = FIELDS[op] | LOWERING_FIELDS
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(k, np.array([]), _field_type(trt, kind)) for k, kind in kinds.items()])

        def create_plugin(self, name, fields, phase):
            return MmcPlugin(self.op, decode_fields(self.op, fields), phase)

    return MmcPlugin, MmcPluginCreator


def run_plugin(op: str, attrs: dict, inputs: list, outputs: list) -> None:
    """Compute mmc.<op> on `inputs` (torch tensors in the node's order: the positions in
    `mmc_inputs`) into `outputs` (tensors of the plugin's output dtypes and shapes), with the
    kernels the cuda target's executor uses for the op."""
    from mmc.plugins import OPS
    from mmc.runtime.cuda.executor import op_kernel

    present = present_inputs(attrs, len(inputs))
    full: list = [None] * (max(present) + 1)
    for i, t in zip(present, inputs):
        full[i] = t
    op_attrs = {k: v for k, v in attrs.items() if k not in LOWERING_FIELDS}
    launch = contextlib.nullcontext()
    if inputs[0].is_cuda:  # TensorRT's kernel before may write what the plugin reads as a weight
        from mmc.plugins.triton_util import no_pdl

        launch = no_pdl()
    with launch:
        results = op_kernel(OPS[op], inputs[0].is_cuda)(full, op_attrs)
    for dst, src in zip(outputs, results):
        dst.copy_(src.reshape(dst.shape))


_TYPESTR = {"FLOAT": ("<f4", None), "HALF": ("<f2", None), "BF16": ("<i2", "bfloat16"), "INT8": ("|i1", None),
            "INT32": ("<i4", None), "INT64": ("<i8", None), "BOOL": ("|b1", None), "FP8": ("|u1", "float8_e4m3fn")}


class _DeviceArray:
    """A device pointer as __cuda_array_interface__ (what torch.as_tensor wraps without a copy)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (int(ptr), False),
                                         "version": 3, "strides": None}


def device_tensor(trt, ptr: int, desc):
    """TensorRT's (pointer, PluginTensorDesc) -> a torch tensor over that memory."""
    import torch

    name = str(desc.type).split(".")[-1]
    typestr, view = _TYPESTR[name]
    t = torch.as_tensor(_DeviceArray(ptr, tuple(desc.dims), typestr), device="cuda")
    return t.view(getattr(torch, view)) if view else t


_REGISTERED: dict[int, list] = {}


def register(trt) -> list:
    """Register a creator per mmc op with `trt`'s plugin registry (once per module); returns them
    (they must stay alive while TensorRT uses them)."""
    if id(trt) not in _REGISTERED:
        _, creator = plugin_classes(trt)
        creators = [creator(op) for op in ROLES]
        registry = trt.get_plugin_registry()
        for c in creators:
            registry.register_creator(c, NAMESPACE)
        _REGISTERED[id(trt)] = creators
    return _REGISTERED[id(trt)]
