"""End-to-end benchmark of the cuda target against Hugging Face transformers (PERF.md's protocol).

    python tools/bench_cuda.py --preset qwen2.5-vl-3b --modes bf16,int8 --peers eager,compile \
        --workloads text,image --runs 10 --json out.json [--workdir DIR] [--deadline 540]

Real-size preset with dummy (seeded random) bf16 weights, batch 1, greedy, a fixed number of new
tokens (EOS ignored). Workloads: `text` = 32 random prompt tokens -> 128 new tokens; `image` = one
448x448 image + a short instruction -> 128. Per workload and engine, after one warm-up run, the
medians and p90 of `--runs` timed runs of:
  preprocessing (image processor, tokenizer, embedding merge), vision (tower), prefill (decoder
  over the prompt + first token), TTFT (their sum), TPOT (decode steps), decode tok/s, and the
  fraction of the HBM bound: decoder weight bytes per token / TPOT / measured copy bandwidth.
Regions are timed with CUDA events around work that ends in a device-to-host copy (the token).
Peers on the same weights and GPU: transformers eager (sdpa) and transformers with a static
cache + torch.compile (mode "default"); TTFT = generate(max_new_tokens=1), decode tok/s =
(N - 1) / (time(N) - TTFT). Also: logits cosine of the bf16 engine against transformers bf16 for
the prefill and 16 teacher-forced decode steps.

Engines and the checkpoint are kept in --workdir (built when missing), so a second invocation on
the same machine measures without recompiling. --deadline (seconds) skips what would not fit.
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

START = time.time()


def _log(msg: str) -> None:
    print(f"[{time.time() - START:6.0f}s] {msg}", flush=True)


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 4), "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 4)}


DEVICE = "cuda"


class Timer:
    """CUDA events around a region that ends with a host sync; milliseconds (wall clock on the
    CPU, for --device cpu dry runs)."""

    def __enter__(self):
        if DEVICE == "cpu":
            self.t = time.perf_counter()
            return self
        self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.a.record()
        return self

    def __exit__(self, *exc):
        if DEVICE == "cpu":
            self.ms = (time.perf_counter() - self.t) * 1e3
            return
        self.b.record()
        self.b.synchronize()
        self.ms = self.a.elapsed_time(self.b)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write), median of 10."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ts = []
    for _ in range(12):
        with Timer() as t:
            y.copy_(x)
        ts.append(t.ms)
    return 2 * x.numel() / statistics.median(ts[2:]) / 1e6


def build(preset: str, workdir: Path, modes: list[str], layers: int | None = None) -> dict[str, Path]:
    """The checkpoint (truncated to `layers`, see build_checkpoint) and one engine per mode."""
    from mmc.api import compile_model
    from mmc.models.qwen2_5_vl.presets import build_checkpoint

    name = f"{preset}-{layers}l" if layers else preset
    ckpt = workdir / name
    if not (ckpt / "config.json").exists():
        _log(f"building checkpoint {ckpt}")
        build_checkpoint(preset, ckpt, layers=layers)
    engines = {}
    for mode in modes:
        out = workdir / f"{name}-{mode}.mmc"
        if not (out / "manifest.json").exists():
            _log(f"compiling {out.name}")
            t = time.time()
            quant, _, extra = mode.partition("+")  # "int8+lm_head": --int8 --quantize-lm-head
            res = compile_model(str(ckpt), output=out, target="cuda", passes="all", progress=False,
                                quantize=None if quant == "bf16" else quant, quantize_lm_head=extra == "lm_head",
                                accuracy_report=False)
            slow = sorted(res.seconds.items(), key=lambda kv: -kv[1])[:6]
            _log(f"compiled {out.name} in {time.time() - t:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in slow)})")
        engines[mode] = out
    return {"checkpoint": ckpt, **engines}


def workload_inputs(engine, kind: str, prompt_tokens: int, image_path: Path):
    """(prompt ids, pixel_values, grid) for a workload, from the engine's own processor."""
    if kind == "text":
        rng = np.random.default_rng(0)
        return rng.integers(10, engine.host.get("bpe_vocab", 350), size=prompt_tokens).astype(np.int64), None, None
    p = engine.processor.prepare("Describe this image in detail, please: what objects, colors and people "
                                 "do you see, and where are they?", [str(image_path)])
    return p.input_ids, p.pixel_values, p.image_grid_thw


def mmc_run(engine, ids, pix, grid, new_tokens: int, keep_logits: bool = False):
    """One generation with the engine's own steps; returns the timings (ms), the tokens and, with
    keep_logits (untimed use), a copy of each step's logits [V]."""
    from mmc.runtime.sampling import SamplingParams
    from mmc.runtime.vision_glue import mrope_positions

    h = engine.host
    greedy, rng = SamplingParams(), np.random.default_rng(0)
    t0 = time.perf_counter()
    embeds = engine.embed(ids).copy()
    if pix is not None:
        t_pre = (time.perf_counter() - t0) * 1e3
        with Timer() as tv:
            img = engine.encode_images(pix, grid)
        t1 = time.perf_counter()
        embeds[ids == h["image_token_id"]] = img
        pos, delta = mrope_positions(ids, h["image_token_id"], grid, h["spatial_merge_size"])
        t_pre += (time.perf_counter() - t1) * 1e3
    else:
        pos, delta = np.broadcast_to(np.arange(len(ids)), (3, len(ids))).copy(), 0
        t_pre = (time.perf_counter() - t0) * 1e3
        tv = None
    mask = np.ones((1, len(ids)), dtype=np.int64)
    with Timer() as tp:
        logits, state = engine._prefill_logits(embeds[None].astype(np.float32), pos[:, None, :], mask)
        tok = engine.select_tokens(logits, greedy, rng)
    tokens = [int(tok[0])]
    kept = [logits[0].float().clone()] if keep_logits else None  # (decode logits live in the graph's buffer)
    nxt = len(ids) + delta
    with Timer() as td:
        for i in range(new_tokens - 1):
            mask = np.ones((1, len(ids) + i + 1), dtype=np.int64)
            p = np.full((3, 1, 1), nxt + i, dtype=np.int64)
            logits, state = engine._decode_logits(tok, p, mask, state)
            tok = engine.select_tokens(logits, greedy, rng)
            tokens.append(int(tok[0]))
            if keep_logits:
                kept.append(logits[0].float().clone())
    vision = tv.ms if tv else 0.0
    return {"preprocessing_ms": t_pre, "vision_ms": vision, "prefill_ms": tp.ms,
            "ttft_ms": t_pre + vision + tp.ms, "tpot_ms": td.ms / (new_tokens - 1),
            "decode_tok_s": (new_tokens - 1) / (td.ms / 1e3)}, tokens, kept


def summarize(runs: list[dict]) -> dict:
    return {k: _stats([r[k] for r in runs]) for k in runs[0]}


def weight_bytes(engine) -> int:
    """Device bytes of the decoder's constants (what one decode step reads)."""
    return sum(t.numel() * t.element_size() for t in engine.decoder.constants.values() if t.device.type == DEVICE)


def hf_model(ckpt: Path, dtype=torch.bfloat16):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype,
                                                              attn_implementation="sdpa").to(DEVICE).eval()


IMAGE_TOKEN = [0]  # set from the engine's host metadata


def hf_inputs(ids, pix, grid, dtype=torch.bfloat16):
    """transformers' inputs for the same prompt; mm_token_type_ids marks the image tokens (without it
    transformers 5 gives image tokens text positions instead of M-RoPE's)."""
    out = {"input_ids": torch.from_numpy(ids)[None].to(DEVICE), "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=DEVICE)}
    if pix is not None:
        out |= {"pixel_values": torch.from_numpy(pix).to(DEVICE, dtype), "image_grid_thw": torch.from_numpy(grid).to(DEVICE),
                "mm_token_type_ids": torch.from_numpy(ids == IMAGE_TOKEN[0]).int()[None].to(DEVICE)}
    return out


def hf_run(model, inputs, new_tokens: int, **gen) -> dict:
    kw = dict(do_sample=False, pad_token_id=model.generation_config.pad_token_id, **gen)
    with torch.inference_mode():
        with Timer() as t1:
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **kw)
        with Timer() as tn:
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    return {"ttft_ms": t1.ms, "tpot_ms": (tn.ms - t1.ms) / (new_tokens - 1),
            "decode_tok_s": (new_tokens - 1) / ((tn.ms - t1.ms) / 1e3)}


def logits_cosine(engine, models: dict, ids, pix, grid, steps: int = 16) -> dict:
    """Teacher-forced on the engine's greedy continuation: the engine's prefill + `steps` decode
    logits against transformers run the same way (prefill, then one token per step on its KV
    cache, M-RoPE positions as generate() gives them), per reference model (bf16, fp32). Also
    against transformers' single forward over the whole sequence (`*_one_pass`, the measure of
    the 2026-11-21 runs), whose decode positions come from prefill-shaped GEMMs and attention."""
    from mmc.runtime.vision_glue import mrope_positions

    _, tokens, ours = mmc_run(engine, ids, pix, grid, steps + 1, keep_logits=True)  # step i's logits chose tokens[i]
    delta = mrope_positions(ids, engine.host["image_token_id"], grid, engine.host["spatial_merge_size"])[1] \
        if pix is not None else 0
    full = np.concatenate([ids, np.array(tokens[:steps], dtype=np.int64)])
    out, refs = {}, {}
    for name, model in models.items():
        refs[name] = hf_stepwise_logits(model, ids, pix, grid, tokens[:steps], len(ids) + delta)
        out[f"mmc_vs_transformers_{name}"] = cosines(ours, refs[name])
        with torch.inference_mode():
            one_pass = model(**hf_inputs(full, pix, grid, model.dtype)).logits[0, len(ids) - 1:].float()
        out[f"mmc_vs_transformers_{name}_one_pass"] = cosines(ours, one_pass)
    if len(refs) == 2:
        out["transformers_bf16_vs_fp32"] = cosines(refs["bf16"], refs["fp32"])
    return out


def hf_stepwise_logits(model, ids, pix, grid, tokens, next_pos: int, steps: int = 0) -> list:
    """transformers' logits for the prompt's last position, then for each of `tokens` fed one at
    a time on its DynamicCache (decode position of token i: next_pos + i on all three M-RoPE axes);
    tokens None: its own greedy choice, for `steps` steps."""
    from transformers import DynamicCache

    with torch.inference_mode():
        model.model.rope_deltas = None
        cache = DynamicCache(config=model.config)
        out = model(**hf_inputs(ids, pix, grid, model.dtype), past_key_values=cache, use_cache=True)
        logits = [out.logits[0, -1].float()]
        for i in range(steps if tokens is None else len(tokens)):
            t = int(logits[-1].argmax()) if tokens is None else tokens[i]
            out = model(input_ids=torch.tensor([[t]], device=DEVICE),
                        attention_mask=torch.ones(1, len(ids) + i + 1, dtype=torch.long, device=DEVICE),
                        position_ids=torch.full((3, 1, 1), next_pos + i, dtype=torch.long, device=DEVICE),
                        past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float())
    return logits


def cosines(ours, ref) -> dict:
    """Per step (float64 cosines): min, mean, steps and top-1 agreement."""
    cos = [torch.nn.functional.cosine_similarity(a.to(b.device).double(), b.double(), dim=0).item()
           for a, b in zip(ours, ref)]
    top1 = sum(int(a.argmax().item() == b.argmax().item()) for a, b in zip(ours, ref))
    return {"min": round(min(cos), 6), "mean": round(sum(cos) / len(cos), 6), "steps": len(cos), "top1_agree": top1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-vl-3b")
    ap.add_argument("--layers", type=int, default=0, help="keep only this many decoder layers / vision blocks (0: all)")
    ap.add_argument("--workdir", default="/tmp/mmc-bench")
    ap.add_argument("--modes", default="bf16", help="comma list of bf16, int8, int4 (+lm_head: its lm_head too)")
    ap.add_argument("--peers", default="eager,compile", help="comma list of eager, compile (or none)")
    ap.add_argument("--workloads", default="text,image")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after which remaining parts are skipped")
    ap.add_argument("--json", default=None)
    ap.add_argument("--build-only", action="store_true", help="build the checkpoint and engines, then stop")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of this script (tiny preset)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    from PIL import Image

    from mmc.runtime.cuda.engine import CudaEngine

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    modes, peers = args.modes.split(","), [p for p in args.peers.split(",") if p and p != "none"]
    workloads = args.workloads.split(",")
    report = {"command": " ".join(["python", "tools/bench_cuda.py", *(argv or sys.argv[1:])]),
              "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "preset": args.preset, "new_tokens": args.new_tokens, "runs": args.runs, "results": {}, "skipped": []}
    report["copy_GBps"] = round(copy_bandwidth()) if DEVICE == "cuda" else 1.0
    _log(f"{report['gpu']}: copy bandwidth {report['copy_GBps']} GB/s")
    paths = build(args.preset, workdir, modes, layers=args.layers or None)
    if args.build_only:
        return 0
    image = workdir / "image448.png"
    Image.fromarray((np.random.default_rng(1).random((448, 448, 3)) * 255).astype(np.uint8)).save(image)

    def over() -> bool:
        return time.time() - START > args.deadline

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    inputs = {}
    for mode in modes:
        engine = CudaEngine(paths[mode], device=DEVICE, max_seq_len=1024, kernels=args.kernels, verify=False)
        IMAGE_TOKEN[0] = engine.host.get("image_token_id", -1)
        wbytes = weight_bytes(engine)
        report.setdefault("decoder_weight_bytes", {})[mode] = wbytes
        for kind in workloads:
            if over():
                report["skipped"].append(f"mmc {mode} {kind}")
                continue
            ids, pix, grid = inputs.setdefault(kind, workload_inputs(engine, kind, args.prompt_tokens, image))
            mmc_run(engine, ids, pix, grid, args.new_tokens)  # warm-up (captures the decode graph)
            runs = [mmc_run(engine, ids, pix, grid, args.new_tokens)[0] for _ in range(args.runs)]
            s = summarize(runs)
            s["hbm_fraction"] = round(wbytes / (s["tpot_ms"]["median"] / 1e3) / (report["copy_GBps"] * 1e9), 4)
            s["weight_bytes_per_token"] = wbytes
            s["prompt_tokens"] = len(ids)
            report["results"][f"mmc-{mode}/{kind}"] = s
            _log(f"mmc {mode} {kind}: TTFT {s['ttft_ms']['median']:.1f} ms (vision {s['vision_ms']['median']:.1f}, "
                 f"prefill {s['prefill_ms']['median']:.1f}), decode {s['decode_tok_s']['median']:.1f} tok/s, "
                 f"{100 * s['hbm_fraction']:.0f}% of HBM")
            save()
        if mode == "bf16" and not over():
            models = {"bf16": hf_model(paths["checkpoint"]), "fp32": hf_model(paths["checkpoint"], torch.float32)}
            report["cosine"] = {k: logits_cosine(engine, models, *inputs[k]) for k in workloads if k in inputs}
            _log(f"logits cosine (prefill + 16 decode steps): {report['cosine']}")
            del models
            save()
        del engine
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if peers:
        model = hf_model(paths["checkpoint"])
        for peer in peers:
            gen = {}
            if peer == "compile":
                model.generation_config.cache_implementation = "static"
                model.forward = torch.compile(model.forward, mode="default")
            for kind in workloads:
                if over():
                    report["skipped"].append(f"transformers-{peer} {kind}")
                    continue
                hin = hf_inputs(*inputs[kind])
                t = time.time()
                hf_run(model, hin, args.new_tokens, **gen)  # warm-up (compiles)
                _log(f"transformers {peer} {kind}: warm-up {time.time() - t:.0f} s")
                runs = [hf_run(model, hin, args.new_tokens, **gen) for _ in range(args.runs)]
                s = summarize(runs)
                wb = report["decoder_weight_bytes"].get("bf16", 0)  # the same weights, read once per token
                s["hbm_fraction"] = round(wb / (s["tpot_ms"]["median"] / 1e3) / (report["copy_GBps"] * 1e9), 4)
                report["results"][f"transformers-{peer}/{kind}"] = s
                _log(f"transformers {peer} {kind}: TTFT {s['ttft_ms']['median']:.1f} ms, decode {s['decode_tok_s']['median']:.1f} tok/s")
                save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
