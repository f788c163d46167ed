"""CUDA graphs for the cuda engine: capture a run once per input-shape key, then replay it.

    capture(fn, pool)         warm `fn` up twice on a side stream (the executor's host values and
                              uploads of this bucket, Triton autotuning), capture one call; returns
                              (graph, what the captured call returned: its static outputs)
    GraphedRuns(executor)     executor.run(feeds) as graphs keyed by the feeds' shapes and dtypes:
                              the feeds are copied into static device buffers, the graph replays,
                              the outputs are the graph's own tensors (valid until the next call)

Every graph of one engine shares one memory pool: the decode step, the prefill of each length
bucket and the vision tower of each image shape run one after another, never at once, so their
activations reuse the same memory (the caching allocator frees each value after its last reader
during capture, so within a graph too memory is reused by liveness). What a graph keeps for
itself: its static inputs and outputs. A plan's host steps depend on input shapes alone
(compiler/plan.py), so one graph per shape key is exact; `limit` bounds how many keys are kept
(least recently used first out).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def capture(fn, pool=None):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class GraphedRuns:
    def __init__(self, executor, pool=None, limit: int = 8):
        self.executor, self.pool, self.limit = executor, pool, limit
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()

    def __call__(self, feeds: dict[str, torch.Tensor], **run) -> dict[str, torch.Tensor]:
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in feeds.items())
        entry = self.graphs.get(key)
        if entry is None:
            static = {n: torch.empty(t.shape, dtype=t.dtype, device=self.executor.device) for n, t in feeds.items()}
            for n, t in feeds.items():
                static[n].copy_(t)
            graph, out = capture(lambda: self.executor.run(static, **run), self.pool)
            entry = self.graphs[key] = (graph, static, out)
            while len(self.graphs) > self.limit:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            for n, t in feeds.items():
                entry[1][n].copy_(t, non_blocking=t.device.type == "cuda")
        entry[0].replay()
        return entry[2]
