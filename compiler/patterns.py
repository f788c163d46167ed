"""Declarative graph patterns: a rule is a pattern + a check that gives a reason + a rewrite.

    x, eps = Var("x"), Const("eps")
    pattern = Op("Div", Const("one"), x, label="div")
    rule = Rule("div-one-to-reciprocal", pattern,
                check=lambda m: None if m.scalar("one") == 1.0 else "numerator is not 1",
                rewrite=lambda g, m, ctx: m.replace_root("Reciprocal", [m["x"]]))

Patterns are trees rooted at the node whose output the rewrite replaces: `Op(op, *inputs)`
matches a node by op type (and optional attrs / `commute=True` for two-input ops), an input
pattern matches the tensor feeding that input: `Var` any tensor (bound by name; the same name
must bind the same tensor), `Const` a weight, `Op` a tensor produced by a matching node,
`AnyOf(p1, p2)` the first alternative that matches. Every rejection — by the matcher or by the
rule's check — is a reason string (a name used twice, Var or Const, must bind one tensor); `apply_rules` counts hits per rule and keeps, for each rule,
the nearest miss (the candidate that matched the most pattern nodes) and its reason, which the
report shows for rules that fired zero times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .ir import replace_uses


class Pattern:
    pass


@dataclass
class Var(Pattern):
    name: str


@dataclass
class Const(Pattern):
    name: str


@dataclass
class AnyOf(Pattern):
    options: tuple

    def __init__(self, *options: Pattern):
        self.options = options


@dataclass
class Op(Pattern):
    op: str
    inputs: tuple
    label: str | None = None
    attrs: dict | None = None  # attribute values the node must have (absent counts as mismatch)
    commute: bool = False      # two-input op: also try the inputs swapped
    domain: str = ""

    def __init__(self, op, *inputs, label=None, attrs=None, commute=False, domain=""):
        self.op, self.inputs, self.label, self.attrs = op, inputs, label, attrs
        self.commute, self.domain = commute, domain


@dataclass
class Match:
    root: gs.Node
    values: dict[str, gs.Tensor] = field(default_factory=dict)
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    size: int = 0  # pattern nodes matched (for nearest-miss ranking)
    graph: gs.Graph | None = None  # set by apply_rules before the check: opset, graph outputs

    def __getitem__(self, name: str) -> gs.Tensor:
        return self.values[name]

    def scalar(self, name: str) -> float | None:
        t = self.values.get(name)
        if isinstance(t, gs.Constant) and np.asarray(t.values).size == 1:
            return float(np.asarray(t.values).reshape(-1)[0])
        return None

    def copy(self) -> Match:
        return Match(self.root, dict(self.values), dict(self.nodes), self.size, self.graph)

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return self.graph is not None and any(o is t for o in self.graph.outputs)

    @property
    def opset(self) -> int:
        return int(self.graph.opset) if self.graph is not None and self.graph.opset else 1


class Miss(Exception):
    def __init__(self, reason: str, size: int):
        super().__init__(reason)
        self.reason, self.size = reason, size


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _bind(name: str, t: gs.Tensor, m: Match, where: str) -> Match:
    """A name used twice in a pattern (Var or Const) must bind one tensor."""
    bound = m.values.get(name)
    if bound is not None and bound is not t:
        raise Miss(f"{where}: {name} is bound to {bound.name!r}, not {t.name!r}", m.size)
    m.values[name] = t
    return m


def _match_value(p: Pattern, t: gs.Tensor, m: Match, where: str) -> Match:
    if isinstance(p, Var):
        return _bind(p.name, t, m, where)
    if isinstance(p, Const):
        if not isinstance(t, gs.Constant):
            raise Miss(f"{where}: {p.name} must be a constant, got activation {t.name!r}", m.size)
        return _bind(p.name, t, m, where)
    if isinstance(p, AnyOf):
        best: Miss | None = None
        for option in p.options:
            try:
                return _match_value(option, t, m.copy(), where)
            except Miss as e:
                best = e if best is None or e.size > best.size else best
        raise best
    node = _producer(t)
    if node is None:
        raise Miss(f"{where}: expected {p.op} to produce {t.name!r}, but it is a graph input or weight", m.size)
    return _match_node(p, node, m, where)


def _match_node(p: Op, node: gs.Node, m: Match, where: str = "") -> Match:
    here = f"{where}/{p.op}" if where else p.op
    if node.op != p.op or (node.domain or "") != p.domain:
        raise Miss(f"{here}: found {node.op}", m.size)
    for k, v in (p.attrs or {}).items():
        if node.attrs.get(k) != v:
            raise Miss(f"{here}: attribute {k}={node.attrs.get(k)!r}, expected {v!r}", m.size)
    if len(node.inputs) < len(p.inputs):
        raise Miss(f"{here}: has {len(node.inputs)} inputs, pattern needs {len(p.inputs)}", m.size)
    orders = [p.inputs]
    if p.commute and len(p.inputs) == 2:
        orders.append(p.inputs[::-1])
    best: Miss | None = None
    for order in orders:
        trial = m.copy()
        trial.size += 1
        if p.label:
            trial.nodes[p.label] = node
        try:
            for i, (sub, t) in enumerate(zip(order, node.inputs)):
                trial = _match_value(sub, t, trial, f"{here}[{i}]")
            return trial
        except Miss as e:
            best = e if best is None or e.size > best.size else best
    raise best


@dataclass
class Rule:
    name: str
    pattern: Op
    rewrite: Callable  # (graph, match, ctx) -> None
    check: Callable | None = None  # (match) -> reason string to reject, or None


@dataclass
class RuleStats:
    hits: dict[str, int] = field(default_factory=dict)
    near_miss: dict[str, dict] = field(default_factory=dict)  # rule -> {node, reason, matched}

    def miss(self, rule: str, node: gs.Node, reason: str, size: int) -> None:
        old = self.near_miss.get(rule)
        if old is None or size > old["matched"]:
            self.near_miss[rule] = {"node": node.name, "reason": reason, "matched": size}


def match(pattern: Op, node: gs.Node) -> Match:
    """Match `pattern` rooted at `node`; raises Miss with the reason."""
    return _match_node(pattern, node, Match(node))


def apply_rules(graph: gs.Graph, rules: list[Rule], ctx, stats: RuleStats | None = None) -> RuleStats:
    """One sweep: each node is tried against the rules in order; the first that matches and
    passes its check rewrites it. Near misses are recorded only for rules that never hit."""
    stats = stats or RuleStats()
    for rule in rules:
        stats.hits.setdefault(rule.name, 0)
    for node in list(graph.nodes):
        for rule in rules:
            if node.op != rule.pattern.op or not node.outputs:  # no outputs: bypassed earlier
                continue
            try:
                m = match(rule.pattern, node)
            except Miss as e:
                stats.miss(rule.name, node, e.reason, e.size)
                continue
            m.graph = graph
            reason = rule.check(m) if rule.check else None
            if reason:
                stats.miss(rule.name, node, reason, m.size + 1000)  # passed the pattern: nearest
                continue
            rule.rewrite(graph, m, ctx)
            stats.hits[rule.name] += 1
            break
    for name, n in stats.hits.items():
        if n:
            stats.near_miss.pop(name, None)
    return stats


def rewrite_root(node: gs.Node, op: str, inputs: list, attrs: dict | None = None, ctx=None) -> gs.Node:
    """Turn the matched root into `op(inputs)` in place: its output tensor (name, consumers,
    graph-output status) stays; the old producers of its inputs are left for dce."""
    node.op, node.domain = op, None
    node.attrs.clear()
    node.attrs.update(attrs or {})
    node.inputs.clear()
    node.inputs.extend(inputs)
    if ctx is not None:
        ctx.created(node)
    return node


def bypass(graph: gs.Graph, node: gs.Node, value: gs.Tensor, ctx=None) -> None:
    """Make readers of node's output read `value` instead (an Identity keeps a graph output's name)."""
    old = node.outputs[0]
    if any(o is old for o in graph.outputs):
        rewrite_root(node, "Identity", [value], ctx=ctx)
        return
    replace_uses(old, value)
    node.outputs.clear()
