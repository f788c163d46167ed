"""The mmc engine format: one folder, a JSON manifest, ONNX graphs, safetensors weights. No pickle.

    ENGINE/                     (conventionally named *.mmc)
      manifest.json             format_version, mmc_version, source {id, sha256}, passes,
                                quantization, target, components {name: {graph | plan + weights, inputs, outputs}},
                                host {...}, files {relpath: {bytes, sha256}}
      graphs/<component>.onnx   + <component>.onnx.data (ONNX external data, same folder)
      weights/host.safetensors  tensors the host glue uses (token embedding table)
      assets/                   tokenizer, image processor and model config files

Every path is relative and must stay inside the engine folder (checked on load, including
the ONNX external-data locations). `write_engine_dir` fills a temporary sibling folder and
renames it into place only when complete, so an interrupted compile never leaves a folder that
loads; the manifest is the last file written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mmc.errors import MmcError

FORMAT_VERSION = 1
# the cuda target's plan.json (compiler/plan.py); 2: mmc.Linear keeps W as [N, K] (a format-1
# plan's [K, N] weights would be read transposed, so the runtime refuses it)
CUDA_PLAN_FORMAT = 2
MANIFEST = "manifest.json"


class EngineError(MmcError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, rel: str) -> Path:
    """Resolve `rel` under `root`, refusing absolute paths and anything that escapes `root`."""
    if not rel or os.path.isabs(rel) or "\\" in rel:
        raise EngineError(f"engine path {rel!r} is not a relative path inside the engine")
    p = (root / rel).resolve()
    if p != root.resolve() and root.resolve() not in p.parents:
        raise EngineError(f"engine path {rel!r} points outside the engine folder")
    return p


def file_table(root: Path) -> dict[str, dict]:
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            table[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return table


@contextmanager
def write_engine_dir(out: Path):
    """Yield a temporary folder to fill; on success it replaces `out` atomically (rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise EngineError("internal: engine folder was not finished (no manifest)")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        backup = None
        if out.exists():
            if not (out / MANIFEST).exists() and any(out.iterdir()):
                raise EngineError(f"{out} exists and is not an mmc engine; refusing to overwrite it")
            backup = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, backup)
        os.rename(tmp, out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=file_table(root))
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: str | Path, verify_hashes: bool = True) -> dict:
    """Read and validate an engine's manifest; every failure is one EngineError line."""
    root = Path(root)
    if not root.exists():
        raise EngineError(f"engine {root} does not exist")
    if root.is_file():
        raise EngineError(f"{root} is a file, not an mmc engine folder (expected a folder with {MANIFEST})")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise EngineError(f"{root} is not an mmc engine (no {MANIFEST}); was the compile interrupted?")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"engine {root} is corrupt: {MANIFEST} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from e
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise EngineError(f"engine {root} is corrupt: {MANIFEST} has no format_version")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EngineError(f"engine {root} is corrupt: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise EngineError(
            f"engine {root} has format version {version}, newer than this mmc supports ({FORMAT_VERSION}); "
            f"upgrade mmc (engine written by mmc {manifest.get('mmc_version', '?')})")
    for key, kind in (("components", dict), ("files", dict), ("target", str), ("host", dict),
                      ("host_weights", str), ("assets", str)):
        if not isinstance(manifest.get(key), kind):
            raise EngineError(f"engine {root} is corrupt: {MANIFEST} lacks {key!r} or it is not a {kind.__name__}")
    for name, comp in manifest["components"].items():
        if not isinstance(comp, dict) or not all(isinstance(comp.get(k), list) for k in ("inputs", "outputs")) \
                or not all(isinstance(comp.get(k), str) for k in _component_files(manifest["target"])):
            raise EngineError(f"engine {root} is corrupt: component {name!r} lacks "
                              f"{'/'.join(_component_files(manifest['target']))}/inputs/outputs")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    unlisted = sorted(on_disk - set(manifest["files"]))
    if unlisted:
        raise EngineError(f"engine {root} is corrupt: {unlisted[0]} is not listed in its manifest")
    for rel, info in manifest["files"].items():
        p = inside(root, rel)
        if not isinstance(info, dict):
            raise EngineError(f"engine {root} is corrupt: file entry {rel!r} is not an object")
        if not p.is_file():
            raise EngineError(f"engine {root} is incomplete: {rel} is missing")
        if p.stat().st_size != info.get("bytes"):
            raise EngineError(f"engine {root} is corrupt: {rel} has {p.stat().st_size} bytes, manifest says {info.get('bytes')}")
        if verify_hashes and sha256_file(p) != info.get("sha256"):
            raise EngineError(f"engine {root} is corrupt: {rel} does not match its checksum")
    for name, comp in manifest["components"].items():
        for key in _component_files(manifest["target"]):
            inside(root, comp[key])
            if comp[key] not in manifest["files"]:
                raise EngineError(f"engine {root} is corrupt: {key} of component {name!r} is not listed in its files")
    return manifest


def _component_files(target: str) -> tuple[str, ...]:
    """The files a component of this target names: an ONNX graph, a plan and its weights, or a
    serialized TensorRT engine."""
    return {"cuda": ("plan", "weights"), "tensorrt": ("engine",)}.get(target, ("graph",))
