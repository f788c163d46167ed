"""Numerical before/after checks in ONNX Runtime, the reference executor.

`run_model` executes a ModelProto (its mmc fused ops lowered for ORT) on named numpy feeds; `compare` runs two models on the same
feeds and reports the largest absolute difference over all graph outputs together with whether
it is within the dtype-aware tolerance (|a-b| <= atol + rtol*|ref|, per element).
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
        self.wanted = {i.name for i in self.sess.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.sess.run(self.names, {k: v for k, v in feeds.items() if k in self.wanted})))


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` (mmc ops lowered to their ORT faces first) on the feeds it takes."""
    return Runner(model).run(feeds)


@dataclass
class CheckResult:
    max_abs_err: float
    within_tolerance: bool
    worst_output: str | None


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
                   feed_sets: list[dict[str, np.ndarray]]) -> CheckResult:
    """Run both models on every feed set; the result is the worst over all of them."""
    from .lowering import lower_model

    before, after = lower_model(before), lower_model(after)
    worst = CheckResult(0.0, True, None)
    for feeds in feed_sets:
        r = compare_outputs(run_model(before, feeds), run_model(after, feeds))
        bad = not (r.max_abs_err <= worst.max_abs_err)  # NaN/inf count as worse
        worst = CheckResult(
            r.max_abs_err if bad else worst.max_abs_err,
            worst.within_tolerance and r.within_tolerance,
            r.worst_output if bad else worst.worst_output,
        )
    return worst
