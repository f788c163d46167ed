"""Target "tensorrt": an optimized graph -> a serialized TensorRT engine, through TensorRT's ONNX
parser, mmc's ops as IPluginV3 plugins (plugins/tensorrt.py).

    prepare     last-position logits (the decoder; compiler/plan_rewrites.py), each mmc node
                renamed to its plugin (Mmc<Op>), its optional inputs dropped (TensorRT has none;
                `mmc_inputs` records the positions kept) and `mmc_outputs` set, then the graph in
                the engine precision
                (compiler/precision.py: strongly typed bf16 / fp16; fp32 as exported)
    parse       the ONNX file (weights as external data) with the plugin creators registered;
                a node the parser cannot take is an MmcError naming it
    build       a strongly typed network; one optimization profile per phase: decoder prefill
                (past 0) and decode (seq 1); vision one, over patch counts; the compute
                capabilities asked for (TensorRT-RTX builds for them without a GPU); the timing
                cache reused from and saved to ~/.cache/mmc/tensorrt; build progress logged
    write       engines/<component>.engine; the manifest's component entry names the profiles
                (the runtime picks an execution context per phase) and counts the plugins
Weight-only int8 / int4 and W8A8 / fp8 engines come from the same Q/DQ graphs the quantization
passes write (TensorRT fuses DequantizeLinear into the GEMM and keeps the codes).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import onnx_graphsurgeon as gs

from . import ir
from .errors import MmcError

log = logging.getLogger("mmc")


def profiles(component: str, max_batch: int, max_seq: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """phase -> dim symbol -> (min, opt, max), from the engine limits (opt clamped into range)."""
    def rng(lo: int, opt: int, hi: int) -> tuple[int, int, int]:
        return lo, max(lo, min(opt, hi)), hi

    if component == "vision":  # patches of one prompt's images (4 per merged token)
        return {"vision": {"patches": rng(4, 1024, 4 * max_seq), "merged": rng(1, 256, max_seq)}}
    return {
        "prefill": {"batch": rng(1, 1, max_batch), "seq": rng(1, 128, max_seq), "past": (0, 0, 0),
                    "total": rng(1, 128, max_seq)},
        "decode": {"batch": rng(1, 1, max_batch), "seq": (1, 1, 1), "past": rng(1, 128, max_seq - 1),
                   "total": rng(2, 129, max_seq)},
    }


def _gpu_capability() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except ImportError:
        pass
    raise MmcError("full TensorRT builds on the GPU it targets, and no CUDA GPU is available here "
                   "(TensorRT-RTX builds without one: pip install tensorrt-rtx)")


def prepare(graph: gs.Graph, component: str, precision: str) -> dict:
    """The graph as the parser gets it (in place); returns what was done."""
    from mmc.plugins import DOMAIN
    from mmc.plugins.tensorrt import NAMESPACE, PREFIX, ROLES, plugin_name

    from .plan_rewrites import last_logits
    from .precision import lower_precision

    done = {"last_logits": component == "decoder" and last_logits(graph)}
    plugins: dict[str, int] = {}
    for node in graph.nodes:
        if node.domain != DOMAIN:
            continue
        if node.op not in ROLES:
            raise MmcError(f"target tensorrt: no plugin for mmc.{node.op} (node {node.name!r} of the {component} graph)")
        kept = [i for i, t in enumerate(node.inputs) if t.name]
        ins = [node.inputs[i] for i in kept]
        node.inputs.clear()
        node.inputs.extend(ins)
        while node.outputs and not node.outputs[-1].name:
            node.outputs.pop()
        node.attrs["mmc_inputs"] = kept
        node.attrs["mmc_outputs"] = len(node.outputs)
        node.attrs["plugin_namespace"] = NAMESPACE  # (parsers that do not fall back to the domain)
        plugins[node.op] = plugins.get(node.op, 0) + 1
        node.op = plugin_name(node.op)

    def keep(node: gs.Node, i: int) -> bool:  # inputs a plugin reads in float32 whatever the activations
        if node.domain != DOMAIN:
            return False
        return ROLES[node.op.removeprefix(PREFIX)][node.attrs["mmc_inputs"][i]] == "scale"

    done["precision"] = lower_precision(graph, precision, keep)
    done["plugins"] = plugins
    return done


def _is_fp8(t) -> bool:
    """float8 values (gs gives lazily loaded constants their ONNX type number)."""
    import onnx

    d = t.dtype
    if isinstance(d, int):
        return d in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)
    return d is not None and "float8" in str(getattr(d, "name", d))


class _Log:
    """TensorRT's messages into the mmc log (debug; errors kept for the failure message): without
    a GPU TensorRT-RTX logs a CUDA driver error at the start of every successful build."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                log.debug("tensorrt: %s", msg)

        return Logger()


class _Progress:
    """TensorRT's build phases to the mmc log (a tqdm-free monitor: builds are a few phases)."""

    def __new__(cls, trt):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                log.info("tensorrt: %s (%d steps)", phase_name, num_steps)

            def step_complete(self, phase_name, step):
                return True

            def phase_finish(self, phase_name):
                log.debug("tensorrt: %s done", phase_name)

        return Monitor()


def strongly_typed_network(trt, builder):
    """A network whose tensor types come from the ONNX graph (TensorRT-RTX has only these)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return builder.create_network(1 << int(flag) if flag is not None else 0)


def timing_cache_path(flavour: str, version: str, capabilities: list[str]) -> Path:
    root = Path(os.environ.get("MMC_CACHE_DIR", Path.home() / ".cache" / "mmc")) / "tensorrt"
    return root / f"{flavour}-{version}-sm{'_'.join(c.replace('.', '') for c in capabilities)}.timing"


def build_engine(graph: gs.Graph, component: str, precision: str, stage: Path, capabilities: list[str] | None,
                 max_batch: int, max_seq: int, flavour: str | None = None) -> dict:
    """Prepare, parse and build `graph`; write engines/<component>.engine into the engine being
    staged; return the manifest's component entry (and `target_info` keys under "_target")."""
    from mmc.plugins.tensorrt import register
    from mmc.runtime.tensorrt import RTX_CAPABILITIES, capability_name, load_trt

    trt, flavour = load_trt(flavour)
    if flavour == "tensorrt":  # full TensorRT builds for the GPU it runs on
        here = _gpu_capability()
        if capabilities and capabilities != [here]:
            raise MmcError(f"full TensorRT builds for the GPU here (compute capability {here}), "
                           f"not {', '.join(capabilities)}; TensorRT-RTX builds for others")
        capabilities = [here]
    if flavour == "tensorrt_rtx":
        fp8 = any(_is_fp8(t) for t in graph.tensors().values())
        capabilities = capabilities or [c for c in RTX_CAPABILITIES if float(c) >= (8.9 if fp8 else 8.0)]
        bad = [c for c in capabilities if c not in RTX_CAPABILITIES]
        if bad:
            raise MmcError(f"TensorRT-RTX cannot build for compute capability {', '.join(bad)} "
                           f"(it builds for {', '.join(RTX_CAPABILITIES)})")
        if fp8 and any(float(c) < 8.9 for c in capabilities):
            raise MmcError(f"fp8 engines need compute capability >= 8.9; asked for {', '.join(capabilities)} "
                           "(use --trt-capability 8.9,12.0)")
    done = prepare(graph, component, precision)
    register(trt)
    logger = _Log(trt)
    builder = trt.Builder(logger)
    network = strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="mmc-trt-") as tmp:
        path = Path(tmp) / f"{component}.onnx"
        ir.save_model(ir.to_model(graph), path)
        if not parser.parse_from_file(str(path)):
            errors = [parser.get_error(i) for i in range(parser.num_errors)]
            first = errors[0]
            raise MmcError(f"target tensorrt: the {trt.__name__} ONNX parser rejected the {component} graph at node "
                           f"{first.node_name() or first.node()!r} ({first.node_operator()}): {first.desc()}"
                           + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    config = builder.create_builder_config()
    if flavour == "tensorrt_rtx":
        config.num_compute_capabilities = len(capabilities)
        for i, cc in enumerate(capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, capability_name(cc)), i)
    phases = profiles(component, max_batch, max_seq)
    for dims in phases.values():
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = [_dim_range(d, dims, t.name, component) for d in _symbols(graph, t.name, t.shape)]
            profile.set_shape(t.name, *[tuple(r[k] for r in shape) for k in range(3)])
        if config.add_optimization_profile(profile) < 0:
            raise MmcError(f"target tensorrt: TensorRT rejected the {component} optimization profile {dims}")
    cache_file = timing_cache_path(flavour, trt.__version__, capabilities)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    config.progress_monitor = _Progress(trt)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise MmcError(f"target tensorrt: {trt.__name__} could not build the {component} engine"
                       + (f": {logger.errors[-1]}" if logger.errors else ""))
    seconds = time.perf_counter() - t0
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(memoryview(config.get_timing_cache().serialize()))
    except OSError as e:  # a read-only home: the build stands, the next one times again
        log.warning("tensorrt: timing cache not saved (%s)", e)
    (stage / "engines").mkdir(exist_ok=True)
    rel = f"engines/{component}.engine"
    (stage / rel).write_bytes(memoryview(blob))
    def spec(t) -> dict:
        return {"name": t.name, "dtype": str(t.dtype).split(".")[-1].lower(), "shape": list(t.shape)}

    return {
        "engine": rel,
        "inputs": [spec(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [spec(network.get_output(i)) for i in range(network.num_outputs)],
        "profiles": {name: i for i, name in enumerate(phases)},
        "profile_dims": {name: {k: list(v) for k, v in dims.items()} for name, dims in phases.items()},
        "plugins": done["plugins"],
        "precision_lowering": done["precision"],
        "build_seconds": round(seconds, 2),
        "_target": {"runtime": "tensorrt", "flavour": flavour, "version": trt.__version__,
                    "compute_capabilities": capabilities, "precision": precision},
    }


def _symbols(graph: gs.Graph, name: str, shape) -> list:
    """The graph input's dims as the graph names them (symbols for the dynamic ones)."""
    t = next(t for t in graph.inputs if t.name == name)
    return list(t.shape) if t.shape is not None else list(shape)


def _dim_range(d, dims: dict, name: str, component: str) -> tuple[int, int, int]:
    if isinstance(d, int) and d >= 0:
        return (d, d, d)
    if d not in dims:
        raise MmcError(f"target tensorrt: input {name!r} of the {component} graph has a dynamic dim {d!r} "
                       f"without a profile range (known: {', '.join(dims)})")
    return dims[d]


def manifest_target_info(entries: dict) -> dict:
    """The engine's target_info from the components' build records (one TensorRT, one set of
    capabilities for all)."""
    infos = [e.pop("_target") for e in entries.values()]
    info = dict(infos[0])
    if any(i != info for i in infos[1:]):
        raise MmcError("target tensorrt: components built with different TensorRT settings")
    return info


__all__ = ["build_engine", "manifest_target_info", "prepare", "profiles", "strongly_typed_network"]
