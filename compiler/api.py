"""The compile driver behind `mmc compile` and `mmc.compile()`.

    resolve MODEL (checkpoint dir or preset) -> export components to ONNX (models/<family>)
    -> run the pass pipeline on each graph (PassManager) -> lower for the target
    -> write the engine folder atomically (runtime/engine_format.py)

Everything is staged in a temporary folder next to the output; the engine appears only when
complete. `--dump-dir` gets the text IR after every pass and `report.json`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, ir, registry
from .errors import MmcError
from .lowering import lower_graph
from .pass_manager import PassManager, records_json

log = logging.getLogger("mmc")

TARGETS = ("ort", "cuda", "tensorrt")
PLANNED_TARGETS: tuple[str, ...] = ()


@dataclass
class CompileResult:
    engine: Path
    records: list = field(default_factory=list)   # PassRecord per (component, pass)
    nodes: dict = field(default_factory=dict)     # component -> (nodes after export, nodes in engine)
    quantization: dict | None = None              # config, per-layer errors, weight bytes, accuracy
    seconds: dict = field(default_factory=dict)   # wall time per compile step (progress label -> s)


def source_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _signature(model) -> tuple[list[dict], list[dict]]:
    import onnx

    def entry(v):
        tt = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                for d in tt.shape.dim]
        return {"name": v.name, "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name,
                "shape": dims}

    return [entry(v) for v in model.graph.input], [entry(v) for v in model.graph.output]


class _Progress:
    """A tqdm bar on a terminal, silence otherwise (logs still go to the `mmc` logger); the wall
    time of each step goes into `seconds` and the log."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="mmc compile", unit="step", leave=False, file=sys.stderr)

    def step(self, what: str) -> None:
        self._finish()
        log.info("%s", what)
        self._current = (what, time.perf_counter())
        if self.bar is not None:
            self.bar.set_postfix_str(what[:40])
            self.bar.update(1)

    def _finish(self) -> None:
        if self._current is not None:
            what, t0 = self._current
            self.seconds[what] = round(self.seconds.get(what, 0.0) + time.perf_counter() - t0, 3)
            log.debug("%s: %.1f s", what, self.seconds[what])
            self._current = None

    def close(self) -> None:
        self._finish()
        if self.bar is not None:
            self.bar.close()


def default_output(model: str | None) -> Path:
    from mmc.models import DEFAULT_PRESET

    name = Path(str(model or DEFAULT_PRESET).rstrip("/")).name or "model"
    return Path(f"{name}.mmc")


def compile_model(model=None, *, output=None, passes="all", target: str = "ort", dump_dir=None,
                  verify_each: bool = False, check: bool | None = None, exporter: str = "dynamo",
                  opset: int | None = None, pass_modules=(), progress: bool = True, seed: int = 0,
                  quantize: str | None = None, group_size: int = 128,
                  max_drop: float | None = None, calib=None, calib_method: str = "minmax",
                  calib_percentile: float = 99.99, smooth_alpha: float | None = 0.5,
                  kv_cache: str | None = None, precision: str | None = None,
                  quantize_lm_head: bool = False, accuracy_report: bool = True, trt_capabilities: list[str] | None = None,
                  max_batch: int = 4, max_seq_len: int = 2048) -> CompileResult:
    """Compile MODEL (checkpoint dir or preset name) into an engine folder; see `mmc compile --help`."""
    from mmc.models import resolve
    from mmc.runtime import engine_format as fmt

    if target not in TARGETS:
        hint = " (planned, not in this release)" if target in PLANNED_TARGETS else ""
        raise MmcError(f"unknown target {target!r}{hint}; available: {', '.join(TARGETS)}")
    precision = precision or ("fp32" if target == "ort" else "bf16")
    if target == "ort" and precision != "fp32":
        raise MmcError(f"--precision {precision}: target ort engines are fp32 (mixed precision is for --target cuda)")
    if target == "tensorrt" and (max_batch < 1 or max_seq_len < 2):
        raise MmcError(f"--max-batch must be >= 1 and --max-seq-len >= 2 (got {max_batch}, {max_seq_len})")
    for spec in pass_modules:
        registry.load_pass_module(spec)
    pipeline = registry.resolve_pipeline(passes)
    quant = _quant_config(quantize, group_size, smooth_alpha, kv_cache, quantize_lm_head)
    if target == "cuda" and quant is not None and quant.mode == "fp8":
        raise MmcError("--fp8: the cuda target has no fp8 GEMM (use --int8 or --int4 there, or --target tensorrt)")
    if max_drop is not None and (quant is None or not 0 <= max_drop < 100):
        raise MmcError("--max-drop PCT needs quantization and 0 <= PCT < 100" if quant is not None
                       else "--max-drop needs --int8, --int4, --fp8 or --kv-cache")
    if calib is not None and quant is None:
        raise MmcError("--calib needs --int8, --int4, --fp8 or --kv-cache")
    samples = None
    if calib is not None:
        from .calibration import load_jsonl

        samples = load_jsonl(calib)
    if quant is not None:  # after the fusions (merged GEMMs quantize as one), before the final dce
        at = len(pipeline) - 1 if pipeline and pipeline[-1] == "dce" else len(pipeline)
        pipeline = pipeline[:at] + quant_passes(quant) + pipeline[at:]
    model_dir, adapter, source = resolve(model)
    output = Path(output) if output else default_output(model)
    if output.exists() and not (output / fmt.MANIFEST).is_file():
        raise MmcError(f"output {output} exists and is not an mmc engine; choose another -o")
    for parent in output.resolve().parents:
        if parent.exists() and not parent.is_dir():
            raise MmcError(f"cannot write {output}: {parent} is a file")
    dump = Path(dump_dir) if dump_dir else None
    if dump is not None:
        if dump.exists() and not dump.is_dir():
            raise MmcError(f"--dump-dir {dump} is a file")
        dump.mkdir(parents=True, exist_ok=True)
    run_check = bool(check) if check is not None else (verify_each or dump is not None)

    bar = _Progress(total=3 + 2 * (2 + max(1, len(pipeline))) + 2 * (quant is not None), enabled=progress)
    result = CompileResult(engine=output)
    try:
        with tempfile.TemporaryDirectory(prefix="mmc-export-") as work, fmt.write_engine_dir(output) as stage:
            work = Path(work)
            bar.step(f"loading {source}")
            torch_model = adapter.load_torch_model()
            host_weights = adapter.host_weights(torch_model)
            bar.step(f"exporting with the {exporter} exporter")
            components = adapter.export(torch_model, work, exporter=exporter, seed=seed, opset=opset)
            options = {"quant": quant}
            if quant is not None and (accuracy_report or quant.needs_calibration or max_drop is not None):
                bar.step("calibrating" + (f" on {calib}" if calib else " on the built-in set"))
                options["calibration"] = _calibration(adapter, torch_model, components, samples,
                                                      str(calib) if calib else "built-in", calib_method,
                                                      calib_percentile)
            del torch_model  # the graphs hold the weights from here on (a real-size preset: tens of GB)
            gc.collect()
            manager = PassManager(pipeline, dump_dir=dump, check=run_check, verify=verify_each,
                                  stop_on_check_failure=verify_each, progress=bar.step, options=options,
                                  keep_float=accuracy_report or max_drop is not None)
            manifest_components = {}
            for comp in components:
                bar.step(f"{comp.name}: loading the exported graph")
                graph = ir.load_graph(comp.path)
                _remove_export(comp.path)  # in memory now: free the disk (a real-size export is 15-30 GB)
                nodes_export = len(graph.nodes)
                graph, records, _ = manager.run(comp.name, graph, comp.check_feeds)
                result.records += records
                fused_ops = {k: v for k, v in ir.op_counts(graph).items() if k.startswith("mmc.")}
                if quant is not None and comp.name == "decoder":
                    bar.step("measuring quantization accuracy")
                    result.quantization = quantization_summary(
                        quant, manager.options, manager.float_models.get("decoder") if accuracy_report else None,
                        graph, max_drop)
                bar.step(f"{comp.name}: writing the {'plan' if target == 'cuda' else 'graph'}")
                if target in ("cuda", "tensorrt"):
                    from .plan import write_plan
                    from .tensorrt import build_engine

                    entry = write_plan(graph, comp.name, precision, stage) if target == "cuda" else \
                        build_engine(graph, comp.name, precision, stage, trt_capabilities, max_batch, max_seq_len)
                    manifest_components[comp.name] = entry | {"fused_ops": fused_ops}
                    result.nodes[comp.name] = (nodes_export, len(graph.nodes))
                    continue
                graph = lower_graph(graph, target)
                model_proto = ir.to_model(graph)
                rel = f"graphs/{comp.name}.onnx"
                ir.save_model(model_proto, stage / rel)
                inputs, outputs = _signature(model_proto)
                manifest_components[comp.name] = {"graph": rel, "inputs": inputs, "outputs": outputs,
                                                  "nodes": len(graph.nodes), "ops": ir.op_counts(graph),
                                                  "fused_ops": fused_ops}
                if quant is not None and "fp8" in (quant.mode, quant.kv_cache):  # ORT's QDQ fusions take fp8 for int8
                    manifest_components[comp.name]["session_config"] = {"session.disable_quant_qdq": "1"}
                result.nodes[comp.name] = (nodes_export, len(graph.nodes))
            bar.step("writing engine")
            from safetensors.numpy import save_file

            (stage / "weights").mkdir(exist_ok=True)
            save_file(host_weights, str(stage / "weights" / "host.safetensors"))
            (stage / "assets").mkdir()
            for f in adapter.asset_files():
                shutil.copy2(f, stage / "assets" / f.name)
            from mmc.runtime.processing import Processor

            Processor(stage / "assets", adapter.host_metadata())  # fail now, not at the first `mmc run`
            if dump is not None:
                (dump / "report.json").write_text(json.dumps({
                    "mmc_version": __version__, "model": source, "exporter": exporter, "opset": opset,
                    "pipeline": pipeline, "passes": records_json(result.records),
                    "quantization": result.quantization}, indent=1))
            fmt.write_manifest(stage, {
                "mmc_version": __version__,
                "source": {"id": source, "sha256": source_hash(model_dir), "family": adapter.family},
                "exporter": exporter,
                "passes": pipeline,
                "quantization": result.quantization,
                "target": target,
                "target_info": _target_info(target, precision, manifest_components,
                                            model_proto if target == "ort" else None),
                "components": manifest_components,
                "host": adapter.host_metadata(),
                "host_weights": "weights/host.safetensors",
                "assets": "assets",
            })
    finally:
        bar.close()
        result.seconds = bar.seconds
    return result


def _target_info(target: str, precision: str, components: dict, model_proto) -> dict:
    if target == "cuda":
        from mmc.runtime.engine_format import CUDA_PLAN_FORMAT

        return {"runtime": "mmc-cuda", "precision": precision, "plan_format": CUDA_PLAN_FORMAT}
    if target == "tensorrt":
        from .tensorrt import manifest_target_info

        return manifest_target_info(components)
    return {"runtime": "onnxruntime", "opset": int(model_proto.opset_import[0].version)}


def _remove_export(path: Path) -> None:
    """Delete an exported ONNX file and the external data files it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    for name in names:
        f = path.parent / name
        if f.is_file() and f.resolve().parent == path.parent.resolve():
            f.unlink()
    path.unlink()


def _quant_config(quantize: str | None, group_size: int, smooth_alpha: float | None, kv_cache: str | None = None,
                  lm_head: bool = False):
    import dataclasses

    from .quantization import KV_CACHE

    if kv_cache is not None and kv_cache not in KV_CACHE:
        raise MmcError(f"unknown --kv-cache {kv_cache!r} (one of {', '.join(KV_CACHE)})")
    if lm_head and quantize is None:
        raise MmcError("--quantize-lm-head needs --int8, --int4 or --fp8")
    cfg = _weight_config(quantize, group_size, smooth_alpha, kv_cache is not None, lm_head)
    return dataclasses.replace(cfg, kv_cache=kv_cache) if cfg is not None else None


def _weight_config(quantize: str | None, group_size: int, smooth_alpha: float | None, kv: bool, lm_head: bool):
    from .quantization import QuantConfig

    keep = ("patch_embed",) if lm_head else ("lm_head", "patch_embed")  # the logits GEMM: float unless asked
    if quantize is None:
        return QuantConfig("float", keep_float=keep) if kv else None
    if quantize in ("int8", "w8a16"):
        return QuantConfig("int8", keep_float=keep)
    if quantize in ("int4", "w4a16"):
        if group_size < 16 or group_size & (group_size - 1):
            raise MmcError(f"--group-size must be a power of two >= 16 (got {group_size})")
        return QuantConfig("int4", group_size=group_size, keep_float=keep)
    if quantize == "w8a8":
        if smooth_alpha is not None and not 0 <= smooth_alpha <= 1:
            raise MmcError(f"--smooth-alpha must be in [0, 1] (got {smooth_alpha})")
        return QuantConfig("w8a8", keep_float=keep, smooth_alpha=smooth_alpha)
    if quantize == "fp8":
        return QuantConfig("fp8", keep_float=keep)
    raise MmcError(f"unknown quantization {quantize!r} (--int8 [w8a16|w8a8], --int4 or --fp8)")


def quant_passes(quant) -> list[str]:
    """The passes a quantization config appends after the fusions."""
    smooth = ["smooth-quant"] if quant.mode == "w8a8" and quant.smooth_alpha is not None else []
    weights = ["quantize-weights"] if quant.mode != "float" else []
    acts = ["quantize-activations"] if quant.activations else []
    kv = ["quantize-kv-cache"] if quant.kv_cache else []
    return smooth + weights + acts + kv


def _calibration(adapter, torch_model, components, samples, source: str, method: str, percentile: float):
    """Calibration feeds for the exported float graphs (before any pass)."""
    import onnx

    from .calibration import build

    meta = adapter.host_metadata()
    vision = next((onnx.load(str(c.path)) for c in components if c.name == "vision"), None)
    embed = adapter.host_weights(torch_model)["embed_tokens"]
    return build(adapter.model_dir, meta, embed, samples, vision, source, method, percentile)


def quantization_summary(cfg, options: dict, float_model, graph, max_drop: float | None = None) -> dict:
    """Config, calibration, smoothing, per-layer weight error and output SNR, decoder weight bytes
    (quantized vs their fp32 size, float-kept layers reported apart) and logits accuracy on the
    calibration prompts. With `max_drop` (percent of top-1 agreement), the budget search first
    puts the most harmful decoder GEMMs back in float (modifying `graph`) until the budget holds."""
    from .accuracy import budget_search, decoder_accuracy, output_snr

    layers = options.get("quant_layers", {})
    cal = options.get("calibration")
    budget = None
    if max_drop is not None and float_model is not None:
        originals = options.get("quant_originals", {}).get("decoder", {})
        budget = budget_search(graph, originals, float_model, cal, 1 - max_drop / 100)
        restored = set(budget["kept_float"])
        for x in layers.get("decoder", []):
            if x["node"] in restored:
                for k in ("bits", "weights", "activations", "act_amax", "act_absmax"):
                    x.pop(k, None)
                x["kept_float"], x["bytes"] = "budget", x.pop("float_bytes")
    dec = layers.get("decoder", [])
    qbytes = sum(x["bytes"] for x in dec if "bits" in x)
    fbytes = sum(x["float_bytes"] for x in dec if "bits" in x)
    kept = [x for x in dec if "kept_float" in x]
    out = cfg.describe()
    out["calibration"] = cal.describe() if cal is not None else None
    if options.get("smoothing"):
        out["smoothing"] = options["smoothing"]
    out["weight_bytes"] = {"decoder_quantized": qbytes, "decoder_quantized_as_fp32": fbytes,
                           "ratio": round(qbytes / fbytes, 4) if fbytes else None,
                           "kept_float": {f"{x['kept_float']} ({x['node']})" if x["kept_float"] != x["node"]
                                          else x["node"]: x["bytes"] for x in kept}}
    out["layers"] = layers
    if options.get("kv_cache", {}).get("decoder"):
        out["kv_cache_layers"] = _kv_cache_summary(cfg.kv_cache, options["kv_cache"]["decoder"], graph)
    if float_model is not None:
        quant_model = ir.to_model(graph)
        gemm_out = {n.name: n.outputs[0].name for n in graph.nodes if n.op == "MatMul" and n.outputs}
        names = [x["node"] for x in dec if "bits" in x and x["node"] in gemm_out]
        snr = output_snr(float_model, quant_model, cal.feeds["decoder"], [gemm_out[n] for n in names])
        for x in dec:
            if x["node"] in names:
                x["output_snr_db"] = snr[gemm_out[x["node"]]]
        if budget is not None:
            out["budget"] = {k: v for k, v in budget.items() if k != "accuracy"}
            out["accuracy"] = budget["accuracy"]
        else:
            out["accuracy"] = decoder_accuracy(float_model, quant_model, cal)
    return out


def _kv_cache_summary(kind: str, records: list[dict], graph) -> dict:
    """Bytes per cached token (all layers, K and V) quantized vs fp32, and the per-head ranges."""
    from .quantization import kv_dtype

    shapes = {t.name: t.shape for t in graph.inputs}
    per_pos = [int(np.prod([shapes[c][1], shapes[c][3]])) for r in records for c in r["cache"]
               if shapes.get(c) and all(isinstance(shapes[c][i], int) for i in (1, 3))]
    elems = sum(per_pos) if len(per_pos) == 2 * len(records) else None
    return {"dtype": kind, "layers": len(records),
            "bytes_per_token": elems * kv_dtype(kind).itemsize if elems else None,
            "bytes_per_token_fp32": elems * 4 if elems else None,
            "amax_range": [min(min(r["k_amax"] + r["v_amax"]) for r in records),
                           max(max(r["k_amax"] + r["v_amax"]) for r in records)],
            "per_layer": records}


def summary_lines(result: CompileResult) -> list[str]:
    """The one-screen summary `mmc compile` prints: per component, what each pass changed."""
    lines = []
    q = result.quantization
    if q:
        wb, acc = q["weight_bytes"], q.get("accuracy") or {}
        acts = f", activations {q['activations']} per tensor" if q.get("activations") != "float" else ""
        if q["weights"] != "float":
            lines.append(f"quantization {q['weights']} {q['granularity']}{acts}: decoder weights {wb['ratio']}x of"
                         f" fp32 (kept float: {', '.join(wb['kept_float']) or 'none'})")
        else:
            lines.append("quantization: weights float")
        if q.get("kv_cache_layers"):
            kv = q["kv_cache_layers"]
            size = f", {kv['bytes_per_token']} bytes per token (fp32 {kv['bytes_per_token_fp32']})" \
                if kv["bytes_per_token"] else ""
            lines.append(f"  kv cache {kv['dtype']} per kv head in {kv['layers']} layers{size}, head ranges"
                         f" {kv['amax_range'][0]:.3g}..{kv['amax_range'][1]:.3g}")
        if q.get("calibration"):
            c = q["calibration"]
            lines.append(f"  calibration: {c['source']}, {c['method']}, {c['decoder_positions']} decoder positions"
                         f" in {c['decoder_feed_sets']} prefills, {c['vision_feed_sets']} vision runs")
        for comp, smooth in (q.get("smoothing") or {}).items():
            worst = max(smooth, key=lambda r: r["outlier_ratio_before"])
            lines.append(f"  smoothquant alpha {worst['alpha']}: {len(smooth)} {comp} tensors, worst outlier ratio"
                         f" {worst['outlier_ratio_before']} -> {worst['outlier_ratio_after']}")
        if q.get("budget"):
            b = q["budget"]
            lines.append(f"  budget top-1 >= {b['min_top1']:.2%}: {'met' if b['met'] else 'NOT met'}, "
                         f"{len(b['kept_float'])} GEMMs kept in float ({b['evaluations']} evaluations)")
        if acc:
            lines.append(f"  accuracy over {acc['positions']} positions: logits cosine {acc['logits_cosine_mean']:.5f}"
                         f" (min {acc['logits_cosine_min']:.4f}), top-1 agreement {acc['top1_agreement']:.2%},"
                         f" NLL {acc['nll_float']:.3f} -> {acc['nll_quantized']:.3f}")
    for comp, (before, after) in result.nodes.items():
        lines.append(f"{comp}: {before} -> {after} nodes")
        for r in (r for r in result.records if r.component == comp):
            hits = ", ".join(f"{k} {v}" for k, v in r.rewrites.items() if v) or "no change"
            err = f"  max|Δ| {r.check['max_abs_err']:.2g}" if r.check else ""
            lines.append(f"  {r.name:<16} {r.nodes_before:>5} -> {r.nodes_after:<5} {hits}{err}")
            for rule, miss in r.near_misses.items():
                lines.append(f"    not fired: {rule} (nearest: {miss['node']}: {miss['reason']})")
    return lines
