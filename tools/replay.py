"""Replay before refactor: compile models and keep their final IR, or diff it against a saved run.

    python tools/replay.py save  replay-before               # on main, before the refactor
    python tools/replay.py check replay-before               # after: exits 1 if any final IR differs

Each model (default: the tiny preset with both exporters) is compiled with `--passes all` and
its last dumped IR per component is compared as text, so a refactor that changes nothing
shows no diff.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from mmc.api import compile_model

ZOO = [("tiny-qwen2.5-vl", "dynamo"), ("tiny-qwen2.5-vl", "torchscript")]


def final_ir(model: str, exporter: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "dump"
        compile_model(model, output=Path(tmp) / "e.mmc", exporter=exporter, dump_dir=dump, check=False,
                      progress=False)
        return {d.name: sorted(d.glob("*.txt"))[-1].read_text() for d in dump.iterdir() if d.is_dir()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("save", "check"))
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    changed = 0
    for model, exporter in ZOO:
        for comp, text in final_ir(model, exporter).items():
            path = args.folder / f"{model}-{exporter}-{comp}.txt"
            if args.mode == "save":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                continue
            old = path.read_text() if path.exists() else ""
            diff = list(difflib.unified_diff(old.splitlines(), text.splitlines(), str(path), "now", lineterm=""))
            if diff:
                changed += 1
                print("\n".join(diff))
    print(f"{'saved' if args.mode == 'save' else f'{changed} component(s) changed'}", file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
