# ruff: noqa: B023  (each lambda is timed before the loop moves on)
"""Tile sweep of the decode GEMV (plugins/linear/gemv.py) against cuBLAS on the Qwen2.5-VL 3B / 7B
decode shapes, on the GPU. Not a test; picks FLOAT / CODES / PROGRAMS.

    python tools/sweep_gemv.py [--json out.json] [--quick]

Each GEMV call reads a different copy of the weight (copies enough to pass 4× the L2 cache), so
the small qkv / o weights stream from HBM as in a decode step, not from L2. Times are per call
inside a CUDA graph (calls captured back to back, the graph replayed, median): what a decode step
pays, launch gaps included. GB/s = weight bytes / time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tools/", 1)[0])
from tools.bench_kernels import _median_ms  # noqa: E402

SHAPES = {  # name: (K, N, prologue)
    "3b qkv": (2048, 2560, "rms"), "3b o": (2048, 2048, ""), "3b gate_up": (2048, 22016, "skip_rms"),
    "3b down": (11008, 2048, "swiglu"), "3b lm_head": (2048, 151936, ""),
    "7b qkv": (3584, 4608, "rms"), "7b o": (3584, 3584, ""), "7b gate_up": (3584, 37888, "skip_rms"),
    "7b down": (18944, 3584, "swiglu"),
}
L2_BYTES = 50 << 20


def timed(fns, runs: int = 20) -> float:
    """ms per call of fns (run in turn inside one CUDA graph)."""
    from mmc.runtime.cuda.graphs import capture

    graph, _ = capture(lambda: [f() for f in fns])
    graph.replay()
    return _median_ms(graph.replay, runs) / len(fns)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="the defaults only, no sweep")
    ap.add_argument("--only", default="", help="shapes whose name starts with this (e.g. '3b')")
    ap.add_argument("--with-prologue", action="store_true",
                    help="sweep the tiles with the prologue (best_ms / best_tile are then with it)")
    ap.add_argument("--weights", default="bf16-KN,bf16-NK,int8",
                    help="weights to time: bf16-KN ([K, N], mmc.Linear's layout before plan format 2), "
                         "bf16-NK (nn.Linear's [N, K], mmc.Linear's), int8 codes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_gemv: needs a CUDA GPU", file=sys.stderr)
        return 2
    from mmc.plugins.linear import gemv as G
    from mmc.plugins.linear.kernels import weight_only_matmul
    from mmc.plugins.norms.kernels import rms_norm
    from mmc.plugins.swiglu.kernels import swiglu

    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    results = []
    def tiles(bns, bks):
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw} for bn, bk, nw in itertools.product(bns, bks, (4, 8))]

    float_tiles = tiles((32, 64, 128, 256), (32, 64, 128, 256))
    code_tiles = tiles((8, 16, 32, 64, 128), (128, 256, 512, 1024, 2048))
    nk_tiles = tiles((4, 8, 16, 32), (256, 512, 1024, 2048))  # bf16 rows of K: 2 bytes a weight
    for name, (k, n, pro) in SHAPES.items():
        if not name.startswith(args.only):
            continue
        for codes, layout in ((False, "KN"), (False, "NK"), (True, "NK")):
            if ("int8" if codes else f"bf16-{layout}") not in args.weights.split(","):
                continue
            nbytes = k * n * (1 if codes else 2)
            copies = max(2, min(40, -(-4 * L2_BYTES // nbytes)))
            if codes:
                ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev) for _ in range(copies)]
                sc = torch.rand(n, device=dev) * 0.01
            else:  # float W [K, N], or a [K, N] view of nn.Linear's [N, K] (rows of K contiguous)
                shape = (k, n) if layout == "KN" else (n, k)
                ws = [torch.randn(*shape, device=dev, dtype=bf) * 0.02 for _ in range(copies)]
                ws = ws if layout == "KN" else [w.t() for w in ws]
                sc = None
            x = torch.randn(1, 2 * k if pro == "swiglu" else k, device=dev, dtype=bf)
            skip, gamma = torch.randn(1, k, device=dev, dtype=bf), torch.rand(k, device=dev, dtype=bf) + 0.5
            kw = {"scale": sc, "prologue": pro, "gamma": gamma, "skip": skip}

            def ours(tile=None, prologue=True):
                args = kw if prologue else {"scale": sc}
                xin = x if prologue or pro != "swiglu" else x[:, :k]
                return [lambda w=w: G.gemv(xin, w, tile=tile, **args) for w in ws]

            def unfused():  # the prologue's kernel, then cuBLAS / the weight-only kernel
                def one(w):
                    xin = x
                    if pro == "rms":
                        xin = rms_norm(x, gamma, 1e-6)[0]
                    elif pro == "skip_rms":
                        xin = rms_norm(x, gamma, 1e-6, skip)[0]
                    elif pro == "swiglu":
                        xin = swiglu(x)
                    return weight_only_matmul(xin, w, sc, 8) if codes else xin @ w
                return [lambda w=w: one(w) for w in ws]

            row = {"shape": name, "K": k, "N": n, "weight": "int8" if codes else "bf16",
                   "layout": layout, "prologue": pro,
                   "default_ms": timed(ours()), "default_no_prologue_ms": timed(ours(prologue=False)),
                   "unfused_ms": timed(unfused())}
            got, want = ours()[0]()[0].float(), unfused()[0]().float()
            row["max_rel_diff_vs_unfused"] = ((got - want).abs().max() / want.abs().max()).item()
            if not codes:
                row["cublas_ms"] = timed([lambda w=w: x[:, :k] @ w for w in ws])
            if not args.quick:
                row["tiles"] = []  # [(tile, ms)], every tile that compiled
                for tile in (code_tiles if codes else float_tiles if layout == "KN" else nk_tiles):
                    try:
                        row["tiles"].append((tile, timed(ours(dict(tile), prologue=args.with_prologue), runs=10)))
                    except Exception as e:  # noqa: BLE001  (a tile that does not compile)
                        print(f"  {name} {tile}: {type(e).__name__}", flush=True)
                row["best_tile"], row["best_ms"] = best = min(row["tiles"], key=lambda r: r[1])
                row["best_with_prologue_ms"] = timed(ours(dict(best[0])))
            for key in [c for c in row if c.endswith("_ms")]:
                row[key.replace("_ms", "_GBps")] = round(nbytes / row[key] / 1e6)
            results.append(row)
            print(json.dumps({c: v for c, v in row.items() if c != "tiles"}), flush=True)
            if args.json:  # after every shape: a sweep cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results},
                              f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
