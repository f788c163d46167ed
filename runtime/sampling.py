"""Next-token selection: greedy, or temperature / top-k / top-p sampling, in numpy.

Top-k uses `argpartition` (O(V)), and top-p sorts only the candidates left after top-k (or the
whole row when top-k is off), so no full-vocabulary sort happens on the common path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0        # 0: off
    top_p: float = 1.0    # 1.0: off

    def validate(self) -> None:
        from mmc.errors import MmcError

        if self.temperature <= 0:
            raise MmcError(f"temperature must be > 0 (got {self.temperature}); use do_sample=False for greedy")
        if self.top_k < 0:
            raise MmcError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise MmcError(f"top_p must be in (0, 1] (got {self.top_p})")


def select(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B]."""
    if not params.do_sample:
        return logits.argmax(axis=-1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b, row in enumerate(logits.astype(np.float64) / params.temperature):
        cand = np.arange(row.shape[0])
        if 0 < params.top_k < row.shape[0]:
            cand = np.argpartition(-row, params.top_k - 1)[: params.top_k]
        vals = row[cand]
        order = np.argsort(-vals, kind="stable")
        cand, vals = cand[order], vals[order]
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        if params.top_p < 1.0:
            keep = np.cumsum(probs) - probs < params.top_p  # smallest prefix whose mass reaches top_p
            cand, probs = cand[keep], probs[keep] / probs[keep].sum()
        out[b] = cand[rng.choice(len(cand), p=probs)]
    return out
