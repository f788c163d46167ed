"""CPU benchmark: what the pass pipeline buys. Compiles MODEL twice (`--passes none` and
`--passes all`), then measures both engines side by side in one run (interleaved, after a
warm-up): prefill latency of a P-token text prompt and decode tokens/s at batch 1 (one token
per step, KV cache fed back), medians over the repeats. Prints the table and the ratios.

    python tools/bench_passes.py [MODEL] [--prompt-tokens 32] [--steps 64] [--repeats 7]

MODEL defaults to the embedded tiny preset. Numbers depend on the machine; docs/benchmarks.md
records the figures and the machine they were taken on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build(model, passes: str, out: Path) -> Path:
    from mmc.api import compile_model

    compile_model(model, output=out, passes=passes, progress=False)
    return out


def prefill_inputs(engine, n_tokens: int):
    ids = np.arange(n_tokens, dtype=np.int64) % engine.host["vocab_size"]
    embeds = engine.embed(ids)[None]  # [1, P, H]
    pos = np.arange(n_tokens, dtype=np.int64)[None]
    positions = np.broadcast_to(pos, (3, 1, n_tokens)).copy() if engine.mrope else pos
    return embeds, positions, np.ones((1, n_tokens), dtype=np.int64)


def time_prefill(engine, n_tokens: int) -> float:
    embeds, positions, mask = prefill_inputs(engine, n_tokens)
    t0 = time.perf_counter()
    engine.prefill(embeds, positions, mask)
    return time.perf_counter() - t0


def time_decode(engine, n_tokens: int, steps: int) -> float:
    """Seconds per decoded token over `steps` steps after a prefill of n_tokens."""
    embeds, positions, mask = prefill_inputs(engine, n_tokens)
    logits, cache = engine.prefill(embeds, positions, mask)
    token = np.asarray([int(np.argmax(logits[0]))])
    t0 = time.perf_counter()
    for i in range(steps):
        mask = np.ones((1, n_tokens + i + 1), dtype=np.int64)
        pos = np.full((1, 1), n_tokens + i, dtype=np.int64)
        pos = np.broadcast_to(pos, (3, 1, 1)).copy() if engine.mrope else pos
        logits, cache = engine.decode_one_token(token, pos, mask, cache)
        token = np.asarray([int(np.argmax(logits[0]))])
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    from mmc.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        engines = {p: load(build(args.model, p, Path(tmp) / f"{p}.mmc"), device="cpu") for p in ("none", "all")}
        nodes = {p: e.manifest["components"]["decoder"]["nodes"] for p, e in engines.items()}
        for e in engines.values():  # warm-up: first runs allocate
            time_prefill(e, args.prompt_tokens)
            time_decode(e, args.prompt_tokens, 8)
        prefill = {p: [] for p in engines}
        decode = {p: [] for p in engines}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for p, e in engines.items():
                prefill[p].append(time_prefill(e, args.prompt_tokens))
                decode[p].append(time_decode(e, args.prompt_tokens, args.steps))
    med = {p: (statistics.median(prefill[p]) * 1e3, 1 / statistics.median(decode[p])) for p in engines}
    print(f"model: {args.model or 'tiny-qwen2.5-vl'}  prompt {args.prompt_tokens} tokens, "
          f"{args.steps} decode steps, batch 1, median of {args.repeats}")
    print(f"{'passes':<8}{'decoder nodes':>15}{'prefill ms':>12}{'decode tok/s':>14}")
    for p, (pf, tps) in med.items():
        print(f"{p:<8}{nodes[p]:>15}{pf:>12.3f}{tps:>14.1f}")
    print(f"ratio all/none: decode {med['all'][1] / med['none'][1]:.2f}x, "
          f"prefill {med['none'][0] / med['all'][0]:.2f}x faster")


if __name__ == "__main__":
    main()
