"""Numerical before/after checks in ONNX Runtime, the reference executor.

`run_model` executes a ModelProto (its mmc fused ops lowered for ORT) on named numpy feeds; `compare` runs two models on the same
feeds and reports the largest absolute difference over all graph outputs together with whether
it is within the dtype-aware tolerance (|a-b| <= atol + rtol*|ref|, per element).

Feeds follow the graph's declared input types (`feeds_for`): an empty array (a prefill's empty
KV cache) is recast, and float check feeds for a quantized KV cache become codes of its type.
float8 tensors cross into ORT as OrtValues and come back as ml_dtypes arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

# (atol, rtol) per output dtype: passes may reassociate float math, never more than this.
TOLERANCE = {
    np.dtype("float32"): (1e-4, 1e-3),
    np.dtype("float16"): (1e-2, 1e-2),
    np.dtype("float64"): (1e-8, 1e-6),
}


def session(model: onnx.ModelProto, providers: list[str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # judge our graph, not ORT's
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers or ["CPUExecutionProvider"])


def input_types(model: onnx.ModelProto) -> dict[str, np.dtype]:
    return {i.name: _np_type(i.type.tensor_type.elem_type) for i in model.graph.input}


def _np_type(elem: int) -> np.dtype:
    if elem == onnx.TensorProto.FLOAT8E4M3FN:
        import ml_dtypes

        return np.dtype(ml_dtypes.float8_e4m3fn)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def feeds_for(types: dict[str, np.dtype], feeds: dict) -> dict:
    """`feeds` in the declared input `types` (inputs the graph lacks dropped): empty arrays are
    recast; non-empty float arrays for an int8 / float8 input (a quantized KV cache fed float
    check data) become codes of that type (x * 16 rounded, saturated: any codes are a valid
    cache for comparing two graphs that take the same one)."""
    out = {}
    for name, v in feeds.items():
        want = types.get(name)
        if want is None:
            continue
        if isinstance(v, np.ndarray) and v.dtype != want:
            if v.size == 0:
                v = v.astype(want)
            elif v.dtype.kind == "f" and (want == np.int8 or want.name.startswith("float8")):
                top = 127 if want == np.int8 else 448
                v = np.clip(np.rint(v * 16), -top, top).astype(want)
        out[name] = v
    return out


def ort_feeds(feeds: dict) -> dict:
    """float8 arrays as OrtValues (ORT's numpy bridge has no float8)."""
    out = {}
    for name, v in feeds.items():
        if isinstance(v, np.ndarray) and v.dtype.name.startswith("float8"):
            v = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(v).view(np.uint8), onnx.helper.np_dtype_to_tensor_dtype(v.dtype))
        out[name] = v
    return out


class Runner:
    """One ORT session over `model` (mmc ops lowered to their ORT faces first), run on many
    feed sets; `extra_outputs` exposes intermediate tensors by name as outputs too."""

    def __init__(self, model: onnx.ModelProto, extra_outputs=()):
        from .lowering import lower_model

        lowered = lower_model(model)
        if extra_outputs:
            if lowered is model:  # never touch the caller's model
                lowered = onnx.ModelProto()
                lowered.CopyFrom(model)
            model = lowered
            have = {o.name for o in model.graph.output}
            model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t)
                                      for t in dict.fromkeys(extra_outputs) if t not in have)
        self.sess = session(lowered)
        self.names = [o.name for o in self.sess.get_outputs()]
        self.types = input_types(lowered)
        self.fp8_out = {o.name: _np_type(o.type.tensor_type.elem_type) for o in lowered.graph.output
                        if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT8E4M3FN}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.sess.run(self.names, ort_feeds(feeds_for(self.types, feeds)))
        return {n: o.view(self.fp8_out[n]) if n in self.fp8_out else o for n, o in zip(self.names, outs)}


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` (mmc ops lowered to their ORT faces first) on the feeds it takes."""
    return Runner(model).run(feeds)


@dataclass
class CheckResult:
    max_abs_err: float
    within_tolerance: bool
    worst_output: str | None
    feed_sets: int = 0          # feed sets compared


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> CheckResult:
    worst, worst_name, ok = 0.0, None, True
    for name, r in ref.items():
        if name not in got:
            return CheckResult(float("inf"), False, name)
        g = got[name]
        if r.shape != g.shape or r.dtype != g.dtype:
            return CheckResult(float("inf"), False, name)
        if r.dtype.kind in "iub":
            err = float(np.abs(r.astype(np.int64) - g.astype(np.int64)).max()) if r.size else 0.0
            ok &= err == 0
        else:
            if np.isnan(g).any() != np.isnan(r).any() or (np.isnan(g) != np.isnan(r)).any():
                return CheckResult(float("nan"), False, name)
            atol, rtol = TOLERANCE.get(r.dtype, (1e-2, 1e-2))
            finite = np.isfinite(r)
            diff = np.abs(r[finite].astype(np.float64) - g[finite].astype(np.float64))
            err = float(diff.max()) if diff.size else 0.0
            ok &= bool((diff <= atol + rtol * np.abs(r[finite])).all())
            same = (r[~finite] == g[~finite]) | (np.isnan(r[~finite]) & np.isnan(g[~finite]))
            ok &= bool(same.all())
        if err > worst or worst_name is None:
            worst, worst_name = err, name
    return CheckResult(worst, ok, worst_name)


def compare_models(before: onnx.ModelProto, after: onnx.ModelProto,
                   feed_sets: list[dict[str, np.ndarray]], retyped: bool = False) -> CheckResult:
    """Run both models on every feed set; the result is the worst over all of them.

    `retyped=True` (a lossy pass may change the signature, e.g. a quantized KV cache): outputs
    whose type changed are not compared, nor feed sets that would feed a changed input data
    (an empty cache is no data). Otherwise a changed signature fails the check."""
    tb, ta = input_types(before), input_types(after)
    ob = {o.name: o.type.tensor_type.elem_type for o in before.graph.output}
    oa = {o.name: o.type.tensor_type.elem_type for o in after.graph.output}
    changed_in = {n for n in tb if n in ta and tb[n] != ta[n]}
    changed_out = {n for n in ob if n in oa and ob[n] != oa[n]}
    if (changed_in or changed_out) and not retyped:
        return CheckResult(float("inf"), False, f"signature changed: {sorted(changed_in | changed_out)}")
    rb, ra = Runner(before), Runner(after)
    worst = CheckResult(0.0, True, None)
    for feeds in feed_sets:
        if any(np.size(feeds.get(n, ())) for n in changed_in):
            continue
        ref, got = rb.run(feeds), ra.run(feeds)
        r = compare_outputs({k: v for k, v in ref.items() if k not in changed_out}, got)
        bad = not (r.max_abs_err <= worst.max_abs_err)  # NaN/inf count as worse
        worst = CheckResult(
            r.max_abs_err if bad else worst.max_abs_err,
            worst.within_tolerance and r.within_tolerance,
            r.worst_output if bad else worst.worst_output,
            worst.feed_sets + 1,
        )
    return worst
