"""Where the cuda target's time goes: per-op GPU time of the decode step, the prefill and the vision
tower, with torch.profiler (CUPTI), on a real-width preset truncated to a few layers. Not a test.

    python tools/profile_cuda.py --preset qwen2.5-vl-3b --layers 4 [--modes bf16,int8] [--json out.json]

Per engine and region (decode step, text prefill, image prefill, vision tower):
  wall_ms        one call as the engine runs it (decode: the CUDA-graph replay; prefill and
                 vision: as `_prefill_logits` / `encode_images` run them), CUDA events, median
  eager_ms       the same work run step by step without a graph (what launch overhead costs)
  gpu_ms         the sum of the GPU kernel times inside one eager call (the profiler's)
  kernels        GPU kernels launched per call
  ops            per plan op ("op:MatMul", "op:mmc.Attention", ...): calls and GPU µs per call
                 of the region, largest first
  top_kernels    the kernels with the most GPU time
Per-layer costs are what matter: with `--layers L` every per-layer op appears L times per call;
the embedding, the final norm and the lm_head once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmc.tools.bench_cuda import Timer, build, workload_inputs


def _median_ms(fn, runs: int = 20) -> float:
    fn()
    times = []
    for _ in range(runs):
        with Timer() as t:
            fn()
        times.append(t.ms)
    return statistics.median(times)


def _gpu_us(evt) -> float:
    return getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)


def _profile(fn, calls: int = 3) -> dict:
    """GPU time per op label and per kernel of `fn` (an eager call with the executor's labels on)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ops, kernels = {}, {}
    for e in prof.key_averages():
        if e.key.startswith("op:"):
            ops[e.key] = {"calls": e.count / calls, "gpu_us": round(_gpu_us(e) / calls, 1)}
        elif getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA") and _gpu_us(e) > 0:
            kernels[e.key] = {"calls": e.count / calls, "gpu_us": round(_gpu_us(e) / calls, 1)}
    gpu = sum(k["gpu_us"] for k in kernels.values()) / 1e3
    return {"gpu_ms": round(gpu, 3), "kernels": sum(k["calls"] for k in kernels.values()),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["gpu_us"])),
            "top_kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["gpu_us"])[:25])}


def profile_engine(engine, ids_text, image_inputs) -> dict:
    from mmc.runtime.vision_glue import mrope_positions

    h, out = engine.host, {}
    dec, vis = engine.decoder, engine.vision

    def prompt(ids, pix, grid):
        embeds = engine.embed(ids).copy()
        if pix is not None:
            embeds[ids == h["image_token_id"]] = engine.encode_images(pix, grid)
            pos, _ = mrope_positions(ids, h["image_token_id"], grid, h["spatial_merge_size"])
        else:
            pos = np.broadcast_to(np.arange(len(ids)), (3, len(ids))).copy()
        return embeds[None].astype(np.float32), pos[:, None, :], np.ones((1, len(ids)), dtype=np.int64)

    def traced(executor, fn):
        executor.trace = True
        try:
            return _profile(fn)
        finally:
            executor.trace = False

    with torch.inference_mode():
        text = prompt(ids_text, None, None)
        engine._prefill_logits(*text)
        n = text[2].shape[1]
        tok = np.zeros(1, dtype=np.int64)
        pos = np.full((3, 1, 1), n, dtype=np.int64)
        mask = np.ones((1, n + 1), dtype=np.int64)

        def decode():
            logits, _ = engine._decode_logits(tok, pos, mask, {"batch": 1})
            return logits.argmax(-1).cpu()

        r = {"wall_ms": round(_median_ms(decode, 50), 3)}
        engine.cuda_graphs = False
        r["eager_ms"] = round(_median_ms(decode), 3)
        r |= traced(dec, decode)
        engine.cuda_graphs = torch.cuda.is_available()
        out["decode"] = r
        regions = [("prefill_text", dec, lambda: engine._prefill_logits(*text)[0].argmax(-1).cpu())]
        if image_inputs is not None and vis is not None:
            ids, pix, grid = image_inputs
            image = prompt(ids, pix, grid)
            regions += [("vision", vis, lambda: engine.encode_images(pix, grid)),
                        (f"prefill_image_{len(ids)}", dec, lambda: engine._prefill_logits(*image)[0].argmax(-1).cpu())]
        for name, executor, fn in regions:
            r = {"wall_ms": round(_median_ms(fn), 3)}
            graphs, engine.cuda_graphs = engine.cuda_graphs, False
            r["eager_ms"] = round(_median_ms(fn), 3)
            r |= traced(executor, fn)
            engine.cuda_graphs = graphs
            out[name] = r
    out["arena"] = {c: [dict(m, bucket=str(m["bucket"])) for m in ex.memory()] for c, ex in (("decoder", dec), ("vision", vis))
                    if ex is not None}
    return out


def _print(name: str, r: dict) -> None:
    print(f"\n== {name}: wall {r['wall_ms']:.3f} ms, eager {r['eager_ms']:.3f} ms, GPU kernels {r['gpu_ms']:.3f} ms "
          f"in {r['kernels']:.0f} kernels")
    for op, v in list(r["ops"].items())[:14]:
        print(f"  {op:32s} {v['calls']:6.0f} calls {v['gpu_us']:9.1f} us")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-vl-3b")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers and vision blocks to keep (0: all)")
    ap.add_argument("--modes", default="bf16", help="comma list of bf16, int8, int4")
    ap.add_argument("--workdir", default="/tmp/mmc-prof")
    ap.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_cuda: needs a CUDA GPU", file=sys.stderr)
        return 2
    from PIL import Image

    from mmc.runtime.cuda.engine import CudaEngine

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    paths = build(args.preset, workdir, args.modes.split(","), layers=args.layers or None)
    print(f"built in {time.time() - t:.0f} s", flush=True)
    image = workdir / "image448.png"
    Image.fromarray((np.random.default_rng(1).random((448, 448, 3)) * 255).astype(np.uint8)).save(image)
    report = {"command": " ".join(["python", "tools/profile_cuda.py", *(argv or sys.argv[1:])]),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers, "engines": {}}
    for mode in args.modes.split(","):
        engine = CudaEngine(paths[mode], device="cuda", max_seq_len=1024, kernels=args.kernels, verify=False)
        text = workload_inputs(engine, "text", 32, image)[0]
        img = workload_inputs(engine, "image", 32, image)
        r = report["engines"][mode] = profile_engine(engine, text, img)
        print(f"\n##### {mode} ({args.preset}, {args.layers or 'all'} layers)")
        for name, v in r.items():
            if name != "arena":
                _print(name, v)
        for comp, buckets in r["arena"].items():
            for m in buckets:
                print(f"  arena {comp} {m['bucket'][:60]}: {m['values']} values, {m['arena_bytes'] / 2**20:.1f} MiB "
                      f"(sum {m['total_bytes'] / 2**20:.1f} MiB, peak live {m['peak_live_bytes'] / 2**20:.1f} MiB)")
        del engine
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
