"""The `mmc` command line: compile, passes, diff, inspect, run.

Errors a user can fix (MmcError) print one line `mmc: error: ...` and exit 2; anything else is
a bug in mmc and prints one line asking for --debug, which shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import MmcError, first_line

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3


def _presets_help() -> str:
    from mmc.models.qwen2_5_vl.presets import PRESETS

    return "\n".join(f"  {name:<18} {p.summary}" for name, p in PRESETS.items())


def cmd_compile(args) -> int:
    from .api import compile_model, summary_lines

    result = compile_model(
        args.model, output=args.output, passes=args.passes, target=args.target, dump_dir=args.dump_dir,
        verify_each=args.verify_each, check=args.check, exporter=args.exporter, opset=args.opset,
        quantize=args.int8 or args.int4 or args.fp8, group_size=args.group_size, max_drop=args.max_drop,
        calib=args.calib, calib_method=args.calib_method, calib_percentile=args.calib_percentile,
        smooth_alpha=None if args.no_smooth else args.smooth_alpha, kv_cache=args.kv_cache, precision=args.precision,
        quantize_lm_head=args.quantize_lm_head, accuracy_report=not args.no_accuracy_report,
        trt_capabilities=args.trt_capability.split(",") if args.trt_capability else None,
        max_batch=args.max_batch, max_seq_len=args.max_seq_len,
        pass_modules=args.pass_module,
        progress=not args.quiet,
    )
    if not args.quiet:
        for line in summary_lines(result):
            print(line, file=sys.stderr)
    size = sum(f.stat().st_size for f in result.engine.rglob("*") if f.is_file())
    print(f"wrote {result.engine} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_passes(args) -> int:
    from . import registry

    for spec in args.pass_module:
        registry.load_pass_module(spec)
    passes = registry.registered()
    print("passes (`--passes all` runs: " + ", ".join(registry.DEFAULT_PIPELINE) + ")")
    for name, cls in sorted(passes.items()):
        mark = "*" if name in registry.DEFAULT_PIPELINE else " "
        print(f" {mark} {name:<18} {cls.summary}")
    return 0


def _dumps(dump_dir: Path) -> dict[str, list[Path]]:
    comps = {}
    for d in sorted(p for p in dump_dir.iterdir() if p.is_dir()):
        files = sorted(d.glob("[0-9][0-9]-*.txt"))
        if files:
            comps[d.name] = files
    return comps


def cmd_diff(args) -> int:
    dump = Path(args.dump_dir)
    if not dump.is_dir():
        raise MmcError(f"{dump} is not a dump directory (make one with `mmc compile --dump-dir {dump}`)")
    comps = _dumps(dump)
    if not comps:
        raise MmcError(f"{dump} has no pass dumps (expected <component>/NN-<pass>.txt)")
    names = {f.stem.split("-", 1)[1] for files in comps.values() for f in files}
    if args.pass_name and args.pass_name not in names:
        raise MmcError(f"no pass {args.pass_name!r} in {dump} (dumped: {', '.join(sorted(names))})")
    shown = 0
    for comp, files in comps.items():
        for prev, cur in zip(files, files[1:]):
            name = cur.stem.split("-", 1)[1]
            if args.pass_name and name != args.pass_name:
                continue
            diff = list(difflib.unified_diff(prev.read_text().splitlines(), cur.read_text().splitlines(),
                                             f"{comp}/{prev.name}", f"{comp}/{cur.name}", lineterm="", n=1))
            if diff or args.pass_name:
                print("\n".join(diff) if diff else f"# {comp}: pass {name} changed nothing")
                shown += 1
    if not shown:
        print("# no pass changed anything")
    return 0


def cmd_inspect(args) -> int:
    from mmc.runtime.engine_format import read_manifest

    m = read_manifest(args.engine, verify_hashes=True)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"engine      {args.engine}  (format {m['format_version']}, mmc {m.get('mmc_version')}, {size / 2**20:.1f} MiB, checksums ok)")
    print(f"source      {m['source']['id']}  sha256 {m['source']['sha256'][:16]}…  family {m['source'].get('family')}")
    print(f"target      {m['target']}  exporter {m.get('exporter')}  quantization {m.get('quantization') or 'none (fp32)'}")
    print(f"passes      {', '.join(m['passes']) or '(none)'}")
    for name, c in m["components"].items():
        print(f"component   {name}: {c['graph']}  {c.get('nodes', '?')} nodes")
        if c.get("fused_ops"):
            print("    fused   " + ", ".join(f"{k.removeprefix('mmc.')} x{v}" for k, v in c["fused_ops"].items()))
        for io, key in (("in ", "inputs"), ("out", "outputs")):
            sig = [s for s in c[key] if not s["name"].startswith(("past_", "present_"))]
            kv = len(c[key]) - len(sig)
            for s in sig:
                print(f"    {io} {s['name']:<16} {s['dtype']:<8} {s['shape']}")
            if kv:
                print(f"    {io} ... {kv} KV-cache tensors ({'past' if key == 'inputs' else 'present'}_key/value_<layer>)")
    return 0


def cmd_run(args) -> int:
    from mmc.runtime import load

    options = {"max_seq_len": args.max_seq_len} if args.max_seq_len is not None else {}
    if args.kernels is not None:
        options["kernels"] = args.kernels
    engine = load(args.engine, device=args.device, **options)
    kwargs = dict(images=args.image, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.json:
        r = engine.generate(args.prompt, **kwargs)
        print(json.dumps({"token_ids": r.token_ids, "text": r.text}))
        return 0
    for chunk in engine.generate(args.prompt, stream=True, **kwargs):
        print(chunk.text, end="", flush=True)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .api import TARGETS

    p = argparse.ArgumentParser(
        prog="mmc", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="mmc compiles vision-language models (Hugging Face checkpoints) into inference engines.",
        epilog="examples:\n  mmc compile                       # the embedded tiny Qwen2.5-VL -> tiny-qwen2.5-vl.mmc\n"
               "  mmc run tiny-qwen2.5-vl.mmc --prompt 'Describe the image.' --image cat.png\n"
               "  mmc compile ./my-checkpoint --passes all --dump-dir dump && mmc diff dump cse",
    )
    p.add_argument("--version", action="version", version=f"mmc {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a checkpoint or preset into an engine",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export MODEL to ONNX graphs, optimize them with passes, write an engine folder.",
                       epilog="presets (built locally, nothing is downloaded):\n" + _presets_help())
    c.add_argument("model", nargs="?", default=None,
                   help="Hugging Face checkpoint directory or preset name (default: tiny-qwen2.5-vl)")
    c.add_argument("-o", "--output", help="engine folder to write (default: <model>.mmc)")
    c.add_argument("--passes", default="all", help="'all' (default), 'none', or a comma list, e.g. all,my-pass")
    c.add_argument("--target", default="ort", choices=TARGETS,
                   help="backend the engine is for: ort (ONNX Runtime, default), cuda (mmc's own GPU engine) or "
                        "tensorrt (TensorRT-RTX or TensorRT >= 10, mmc's ops as plugins)")
    c.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="float precision of a cuda / tensorrt engine's weights and activations (default: bf16; "
                        "ort: fp32)")
    c.add_argument("--trt-capability", metavar="CC[,CC]", default=None,
                   help="tensorrt: GPU compute capabilities to build for, e.g. 8.9,12.0 (default: TensorRT-RTX's "
                        "8.0,8.6,8.9,12.0,12.1; full TensorRT: the GPU here)")
    c.add_argument("--max-batch", type=int, default=4, help="tensorrt: largest batch the profiles allow (default: 4)")
    c.add_argument("--max-seq-len", type=int, default=2048,
                   help="tensorrt: longest sequence (prompt + generated) the profiles allow (default: 2048)")
    c.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"),
                   help="torch ONNX exporter (default: dynamo; torchscript traces faster)")
    c.add_argument("--opset", type=int, default=None,
                   help="ONNX opset to export with (default: the exporter's; dynamo 17-23, torchscript 14-20)")
    q = c.add_mutually_exclusive_group()
    q.add_argument("--int8", nargs="?", const="w8a16", default=None, metavar="MODE",
                   help="int8 weights per output channel: MODE w8a16 (default; float activations) or w8a8 "
                        "(int8 activations per tensor, calibrated, with SmoothQuant)")
    q.add_argument("--int4", action="store_const", const="int4", default=None,
                   help="int4 weights, group-wise (W4A16; see --group-size)")
    q.add_argument("--fp8", action="store_const", const="fp8", default=None,
                   help="FP8 e4m3 weights per output channel and activations per tensor (for GPU targets)")
    c.add_argument("--kv-cache", choices=("int8", "fp8"), default=None,
                   help="store the decoder's K/V cache as int8 or fp8 e4m3 codes, one calibrated scale per "
                        "kv head (default: float; combines with any weight mode)")
    c.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the logits GEMM (lm_head) too (default: float, as weight-only toolkits keep "
                        "it; it is the largest GEMM of a small model's decode step)")
    c.add_argument("--group-size", type=int, default=128, help="int4 group size along K (default: 128)")
    c.add_argument("--calib", metavar="JSONL", default=None,
                   help='calibration prompts, one JSON object per line: {"text": ..., "image": path} '
                        "(default: a built-in set of text windows and generated images)")
    c.add_argument("--calib-method", choices=("minmax", "percentile"), default="minmax",
                   help="activation range from calibration: absolute max (default) or a percentile of |x|")
    c.add_argument("--calib-percentile", type=float, default=99.99, metavar="P",
                   help="percentile for --calib-method percentile (default: 99.99)")
    c.add_argument("--smooth-alpha", type=float, default=0.5, metavar="A",
                   help="W8A8 SmoothQuant migration strength in [0, 1] (default: 0.5)")
    c.add_argument("--no-smooth", action="store_true", help="W8A8 without SmoothQuant (naive per-tensor)")
    c.add_argument("--max-drop", type=float, default=None, metavar="PCT",
                   help="accuracy budget: keep decoder GEMMs in float until top-1 agreement >= 100-PCT %%")
    c.add_argument("--no-accuracy-report", action="store_true",
                   help="skip the quantization accuracy report (ONNX Runtime on the CPU over the calibration "
                        "prompts: slow for multi-GB models); weight-only --int8/--int4 then need no calibration")
    c.add_argument("--dump-dir", help="write the text IR after every pass and report.json here")
    c.add_argument("--verify-each", action="store_true",
                   help="verify the graph and check its outputs after every pass; stop at the first that fails")
    c.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="numerical before/after check per pass (default: on with --dump-dir/--verify-each)")
    c.add_argument("--pass-module", action="append", default=[], metavar="MODULE",
                   help="import a module or .py file that registers extra passes (repeatable)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=cmd_compile)

    ps = sub.add_parser("passes", help="list the registered passes")
    ps.add_argument("--pass-module", action="append", default=[], metavar="MODULE")
    ps.set_defaults(func=cmd_passes)

    d = sub.add_parser("diff", help="show what a pass changed, from a --dump-dir")
    d.add_argument("dump_dir", metavar="DUMP_DIR")
    d.add_argument("pass_name", nargs="?", metavar="PASS", help="one pass (default: every pass that changed something)")
    d.set_defaults(func=cmd_diff)

    i = sub.add_parser("inspect", help="show an engine's manifest and verify its checksums")
    i.add_argument("engine", metavar="ENGINE")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="generate text with an engine")
    r.add_argument("engine", metavar="ENGINE")
    r.add_argument("--prompt", required=True, help="the prompt; '<image>' marks where each image goes")
    r.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="cuda engines: KV-cache slots per sequence, prompt included (default: 1024)")
    r.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"),
                   help="cuda engines: the plugins' Triton kernels, or their torch references "
                        "(default auto: Triton on a GPU, torch on the CPU)")
    r.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": "..."}')
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="mmc: %(message)s")
    if args.debug:
        os.environ.setdefault("MMC_DEBUG", "1")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.func(args)
    except MmcError as e:
        if args.debug:
            raise
        print(f"mmc: error: {first_line(e, limit=10_000) or type(e).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `mmc diff D | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("mmc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"mmc: internal error: {type(e).__name__}: {first_line(e, limit=10_000)} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
