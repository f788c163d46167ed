"""Runs an ordered pipeline of passes over one component graph, with inspection built in.

For every pass the manager records rewrites per rule, node counts before/after, the op-count
delta and the time taken; with `check=True` it runs the graph before and after the pass in ONNX
Runtime on the component's check feeds and records the largest output difference; with
`verify=True` it runs the verifier after the pass; with `dump_dir` it writes the text IR after
every pass (`<dump>/<component>/NN-<pass>.txt`, `00-export.txt` first) so that `diff` is all it
takes to see what a pass did. A failure names the pass and the component.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from . import ir, registry
from .errors import MmcError, PassCheckError
from .numerics import TOLERANCE, compare_models
from .verifier import verify


@dataclass
class PassContext:
    """Per-component, per-compile state handed to passes (nothing survives between compiles)."""

    component: str
    origins: dict[str, str] = field(default_factory=dict)  # node name -> pass that created it
    near_misses: dict[str, dict] = field(default_factory=dict)  # rule -> nearest miss, this pass
    current_pass: str = "export"
    options: dict = field(default_factory=dict)  # compile options passes read (e.g. "quant"); passes may record results
    _counter: int = 0

    def fresh_name(self, prefix: str) -> str:
        self._counter += 1
        return f"{self.current_pass}/{prefix}_{self._counter}"

    def created(self, node: gs.Node) -> gs.Node:
        """Mark `node` as made by the running pass (shown in dumps); give it a unique name if it has none."""
        if not node.name:
            node.name = self.fresh_name(node.op)
        self.origins[node.name] = self.current_pass
        return node


@dataclass
class PassRecord:
    name: str
    component: str
    index: int
    modified: bool
    rewrites: dict[str, int]
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]
    seconds: float
    check: dict | None = None
    near_misses: dict = field(default_factory=dict)  # rules that fired zero times: where and why


def _op_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = sorted(set(before) | set(after))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


def _output_dtype(graph: gs.Graph) -> np.dtype:
    for t in graph.outputs:
        if t.dtype is not None and np.dtype(t.dtype).kind == "f":
            return np.dtype(t.dtype)
    return np.dtype("float32")


class PassManager:
    def __init__(self, pipeline: list[str], *, dump_dir: str | Path | None = None, check: bool = False,
                 verify: bool = False, stop_on_check_failure: bool = False, progress=None,
                 options: dict | None = None, keep_float: bool = True):
        self.pipeline = pipeline
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.check = check
        self.verify = verify
        self.stop_on_check_failure = stop_on_check_failure
        self.progress = progress  # callable(str) or None
        self.options = options if options is not None else {}
        # component -> ModelProto before the first lossy pass (for the accuracy report; serializing
        # a real-size model costs minutes, so a compile without the report keeps none)
        self.keep_float = keep_float
        self.float_models: dict[str, object] = {}

    def _dump(self, component: str, index: int, name: str, graph: gs.Graph, ctx: PassContext) -> None:
        if self.dump_dir is None:
            return
        d = self.dump_dir / component
        d.mkdir(parents=True, exist_ok=True)
        if index == 0:  # a reused dump dir must not mix in another compile's passes
            for old in d.glob("[0-9][0-9]-*.txt"):
                old.unlink()
        (d / f"{index:02d}-{name}.txt").write_text(ir.graph_text(graph, ctx.origins))

    def run(self, component: str, graph: gs.Graph, feeds: list[dict[str, np.ndarray]] | None = None):
        """Run the pipeline over `graph` in place; return (graph, [PassRecord], PassContext)."""
        ctx = PassContext(component, options=self.options)
        records: list[PassRecord] = []
        self._dump(component, 0, "export", graph, ctx)
        for index, name in enumerate(self.pipeline, start=1):
            if self.progress:
                self.progress(f"{component}: {name}")
            p = registry.create(name)
            ctx.current_pass = name
            ctx.near_misses = {}
            before_counts = ir.op_counts(graph)
            nodes_before = len(graph.nodes)
            lossy = bool(getattr(p, "lossy", False))
            keep = lossy and self.keep_float and component not in self.float_models
            before_model = ir.to_model(graph) if (self.check and feeds) or keep else None
            if keep:
                self.float_models[component] = before_model
            t0 = time.perf_counter()
            try:
                result = p.run(graph, ctx)
            except MmcError:
                raise
            except Exception as e:
                raise MmcError(f"pass {name!r} failed on the {component} graph: {type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - t0
            if self.verify:
                verify(graph, where=f"after pass {name!r} on {component}")
            record = PassRecord(
                name=name, component=component, index=index, modified=bool(result.modified),
                rewrites=dict(result.stats), nodes_before=nodes_before, nodes_after=len(graph.nodes),
                op_delta=_op_delta(before_counts, ir.op_counts(graph)), seconds=round(seconds, 4),
                near_misses=dict(ctx.near_misses),
            )
            if before_model is not None and self.check and feeds:
                res = compare_models(before_model, ir.to_model(graph), feeds, retyped=lossy)
                atol, rtol = TOLERANCE.get(_output_dtype(graph), (1e-2, 1e-2))
                record.check = {"max_abs_err": res.max_abs_err, "within_tolerance": res.within_tolerance,
                                "worst_output": res.worst_output, "atol": atol, "rtol": rtol,
                                "feed_sets": res.feed_sets, "lossy": lossy}
                if self.stop_on_check_failure and not res.within_tolerance and not lossy:
                    self._dump(component, index, name, graph, ctx)
                    raise PassCheckError(
                        f"pass {name!r} changed what the {component} graph computes: max abs err "
                        f"{res.max_abs_err:.3g} on output {res.worst_output!r} exceeds atol {atol:g} + rtol {rtol:g}")
            records.append(record)
            self._dump(component, index, name, graph, ctx)
        return graph, records, ctx


def records_json(records: list[PassRecord]) -> list[dict]:
    return [asdict(r) for r in records]
