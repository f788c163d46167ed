"""The bf16 noise floor of a preset's logits: how far transformers bf16 moves from ITSELF when
only an implementation detail changes, on the same weights, prompt and teacher-forced tokens.

    python tools/noise_floor.py --preset qwen2.5-vl-3b --json out.json [--layers N] [--device cuda]

Issue 5 asks for a logits cosine >= 0.999 between mmc bf16 and transformers bf16 (prefill and 16
decode steps). Any two correct bf16 implementations differ by rounding: each GEMM, attention and
elementwise kernel rounds its outputs to bf16, and a different reduction order flips some of
those roundings. How much those flips move the logits is a property of the model. This script
measures it without mmc: the reference is transformers bf16 as shipped (sdpa attention, default
cuBLAS settings); each variant changes one thing any other engine also changes:

    fp32              the same weights in float32 (the truth bf16 approximates)
    sdpa-<backend>    another of torch's sdpa kernels (flash / efficient / cudnn / math)
    eager-attention   transformers' eager attention (matmul + softmax) instead of sdpa
    fp32-gemm-reduce  cuBLAS with bf16 reduced-precision split-K reductions disabled
    gemm-fp32-accum   every nn.Linear computed in float32 and rounded once (another summation order)

For each: the min and mean cosine over the prompt's last position and `--steps` decode steps
(float64 cosines), and top-1 agreement. Tokens are the reference's greedy continuation; every
variant runs transformers step by step on its own KV cache (as tools/bench_cuda.py's reference).
The model is the preset's seeded init built in memory on `--device` (a GPU draws other values
than the CPU for the same seed, so these are the same distribution as the benchmark's checkpoint,
not the same numbers). A variant that torch refuses on this GPU is reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/tools/", 1)[0])
from tools import bench_cuda  # noqa: E402


def stepwise(model, ids, steps: int, tokens=None) -> list:
    """Logits for the prompt's last position and each decode step, on transformers' KV cache
    (bench_cuda's reference); tokens None: greedy."""
    return bench_cuda.hf_stepwise_logits(model, ids, None, None, tokens, len(ids), steps)


@contextlib.contextmanager
def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name)]):
        yield


@contextlib.contextmanager
def attn_impl(model, impl: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@contextlib.contextmanager
def no_reduced_precision_reduction():
    old = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = old


@contextlib.contextmanager
def float32_linears():
    orig = torch.nn.Linear.forward

    def forward(self, x):
        b = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), b).to(x.dtype)

    torch.nn.Linear.forward = forward
    try:
        yield
    finally:
        torch.nn.Linear.forward = orig


def variants(model, device: str) -> dict:
    v = {"eager-attention": lambda: attn_impl(model, "eager"), "gemm-fp32-accum": float32_linears}
    if device == "cuda":
        for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            v[f"sdpa-{b.split('_')[0].lower()}"] = lambda b=b: sdpa_backend(b)
        v["fp32-gemm-reduce"] = no_reduced_precision_reduction
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-vl-3b")
    ap.add_argument("--layers", type=int, default=0, help="keep only this many decoder layers (0: all)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from mmc.models.qwen2_5_vl.presets import PRESETS, build_tokenizer, preset_model

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(tmp, PRESETS[args.preset].bpe_vocab)
    model = preset_model(args.preset, tok, args.layers or None, device=args.device)
    if model.dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)
    ids = np.random.default_rng(0).integers(10, PRESETS[args.preset].bpe_vocab - 50,
                                            size=args.prompt_tokens).astype(np.int64)
    bench_cuda.DEVICE = args.device
    ref = stepwise(model, ids, args.steps)
    tokens = [int(lg.argmax()) for lg in ref[:-1]]
    report = {"command": " ".join(["python", "tools/noise_floor.py", *(argv or sys.argv[1:])]),
              "preset": args.preset, "layers": args.layers or None, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "reference": "transformers bf16, sdpa (default backend), default cuBLAS settings",
              "vs_reference": {}, "vs_fp32": {}, "skipped": {}}
    runs = {}
    for name, ctx in variants(model, args.device).items():
        try:
            with ctx():
                runs[name] = stepwise(model, ids, args.steps, tokens)
        except Exception as e:  # a backend this GPU / mask does not support
            report["skipped"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        report["vs_reference"][name] = bench_cuda.cosines(runs[name], ref)
        bench_cuda._log(f"{name}: {report['vs_reference'][name]}")
    model = model.float()
    fp32 = stepwise(model, ids, args.steps, tokens)
    report["vs_reference"]["fp32"] = bench_cuda.cosines(fp32, ref)
    report["vs_fp32"] = {"transformers-bf16": bench_cuda.cosines(ref, fp32)} | {k: bench_cuda.cosines(v, fp32) for k, v in runs.items()}
    report["seconds"] = round(time.time() - t0, 1)
    for name, c in report["vs_reference"].items():
        f = report["vs_fp32"].get(name, {})
        print(f"{name:18s} vs transformers bf16: min {c['min']:.6f} mean {c['mean']:.6f}"
              + (f"   vs fp32: min {f['min']:.6f}" if f else ""))
    f = report["vs_fp32"]["transformers-bf16"]
    print(f"{'transformers bf16':18s} vs fp32: min {f['min']:.6f} mean {f['mean']:.6f}")
    for name, why in report["skipped"].items():
        print(f"{name:18s} skipped: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
