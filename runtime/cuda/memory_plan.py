"""The activation arena: one device buffer per executor, and per input-shape bucket the offset of
every activation in it, so that values whose lifetimes do not overlap share memory.

    lifetimes(events)           buffers from a recorded run: each fresh activation is a buffer
                                living from the step that writes it to the last step that reads it
                                or any view of it (Reshape, Transpose, Split halves... alias it)
    plan_offsets(buffers)       offsets in one arena: greedy by size (largest first, each at the
                                lowest aligned offset that no buffer with an overlapping lifetime
                                occupies), the strategy of TFLite's and ONNX Runtime's planners
    ArenaPlan                   the result: offsets, arena bytes, the sum of the buffers' bytes
                                and the largest bytes live at one step (the lower bound)

The executor (runtime/cuda/executor.py) records a bucket's first run, plans it, and from then on
hands each step whose kernel writes into given memory (`OUT_OPS` in onnx_ops.py, the plugins'
Triton kernels) a view of the arena at its offset; graph outputs stay outside the arena (the
caller reads them after the run).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALIGN = 256  # bytes; cuBLAS and Triton's vector loads want aligned rows


@dataclass
class Buffer:
    name: str
    nbytes: int
    start: int  # the step that writes it
    end: int    # the last step that reads it or a view of it


@dataclass
class ArenaPlan:
    offsets: dict[str, int] = field(default_factory=dict)
    arena_bytes: int = 0
    total_bytes: int = 0      # every planned buffer in its own allocation
    peak_live_bytes: int = 0  # the most bytes live at one step: no plan can be smaller


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_offsets(buffers: list[Buffer]) -> ArenaPlan:
    plan = ArenaPlan()
    placed: list[tuple[int, int, Buffer]] = []  # (offset, aligned size, buffer)
    for b in sorted(buffers, key=lambda b: (-b.nbytes, b.start, b.name)):
        size = _align(b.nbytes)
        busy = sorted((o, o + s) for o, s, other in placed if other.start <= b.end and b.start <= other.end)
        offset = 0
        for lo, hi in busy:
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        placed.append((offset, size, b))
        plan.offsets[b.name] = offset
        plan.arena_bytes = max(plan.arena_bytes, offset + size)
    plan.total_bytes = sum(_align(b.nbytes) for b in buffers)
    steps = {s for b in buffers for s in (b.start, b.end)}
    plan.peak_live_bytes = max((sum(_align(b.nbytes) for b in buffers if b.start <= s <= b.end) for s in steps), default=0)
    return plan


def lifetimes(events: list[tuple[int, str, int, str | None]], reads: dict[str, int],
              keep: set[str] = frozenset()) -> list[Buffer]:
    """events: per produced value in step order, (step, name, nbytes, aliased) where `aliased` is
    the value whose memory it views (None: fresh memory); reads: value -> the last step reading
    it. A view keeps its base's buffer alive; a buffer any of whose views is in `keep` (graph
    outputs, read after the run) is left out."""
    base: dict[str, str] = {}
    bufs: dict[str, Buffer] = {}
    for step, name, nbytes, aliased in events:
        if aliased is not None:
            if aliased in base:
                base[name] = base[aliased]
            continue
        base[name] = name
        bufs[name] = Buffer(name, nbytes, step, step)
    for name, root in base.items():
        b = bufs[root]
        b.end = max(b.end, reads.get(name, b.start))
    dropped = {base[n] for n in keep if n in base}
    return [b for n, b in bufs.items() if n not in dropped]
