"""TensorRT for mmc: which TensorRT is installed, and whether an engine built by it can run here.

Two flavours have the same Python API (builder, ONNX parser, IPluginV3):
    tensorrt_rtx   TensorRT-RTX (`pip install tensorrt-rtx`): builds without a GPU; its engines
                   run on compute capability 7.5, 8.0, 8.6, 8.9, 12.0, 12.1 (not 9.0 Hopper)
    tensorrt       full TensorRT >= 10: builds and runs on the GPU it finds
`MMC_TENSORRT=tensorrt|tensorrt_rtx` picks one when both are installed (default: tensorrt_rtx).
Nothing here needs a GPU; `require_gpu` is where a missing or unsupported one is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmc.errors import MmcError

FLAVOURS = ("tensorrt_rtx", "tensorrt")
PIP = {"tensorrt_rtx": "tensorrt-rtx", "tensorrt": "tensorrt"}
# compute capabilities an engine of each flavour can be built for without a GPU ("CURRENT": the GPU here)
RTX_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")


def load_trt(flavour: str | None = None):
    """(module, flavour): the TensorRT Python module to build / load with; an MmcError naming
    what to install when none is importable."""
    import importlib

    wanted = flavour or os.environ.get("MMC_TENSORRT")
    if wanted is not None and wanted not in FLAVOURS:
        raise MmcError(f"unknown TensorRT flavour {wanted!r} (one of {', '.join(FLAVOURS)})")
    for name in (wanted,) if wanted else FLAVOURS:
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        if name == "tensorrt" and int(trt.__version__.split(".")[0]) < 10:
            raise MmcError(f"TensorRT {trt.__version__} is too old: mmc needs tensorrt >= 10 (IPluginV3)")
        if name == "tensorrt_rtx":
            _link_soname(trt)
        return trt, name
    want = wanted or "tensorrt_rtx"
    raise MmcError(f"target tensorrt needs the {want} Python package, which is not installed "
                   f"(pip install {PIP[want]})")


def _link_soname(trt) -> None:
    """The RTX ONNX parser dlopens `libtensorrt_rtx.so` to load plugins, but the wheel ships only
    `libtensorrt_rtx.so.1`: without a link the process aborts at the first plugin node."""
    libs = Path(trt.__file__).resolve().parent.parent / "tensorrt_rtx_libs"
    link, real = libs / "libtensorrt_rtx.so", libs / "libtensorrt_rtx.so.1"
    if real.exists() and not link.exists():
        try:
            link.symlink_to(real.name)
        except FileExistsError:  # another process made it first
            pass
        except OSError as e:
            raise MmcError(f"TensorRT-RTX's parser needs {link} (a link to {real.name}), and it cannot be "
                           f"made ({e.strerror}); create it, or put such a link on LD_LIBRARY_PATH") from e


def capability_name(cc: str) -> str:
    """'8.9' -> 'SM89' (trt.ComputeCapability member)."""
    major, minor = cc.split(".")
    return f"SM{major}{minor}"


def require_gpu(info: dict) -> tuple:
    """Check that an engine described by the manifest's `target_info` can run here: its TensorRT
    flavour and version importable, an NVIDIA GPU present, of a compute capability the engine
    was built for. Returns (trt module, device index); raises one MmcError naming both sides."""
    flavour, built_with = info["flavour"], info["version"]
    try:
        trt, _ = load_trt(flavour)
    except MmcError as e:
        raise MmcError(f"this engine was built with {flavour} {built_with}; {e}") from None
    if trt.__version__ != built_with:
        raise MmcError(f"this engine was built with {flavour} {built_with}, and {flavour} {trt.__version__} "
                       "is installed: rebuild it with mmc compile, or install the version it was built with")
    try:
        import torch
        have_gpu = torch.cuda.is_available()
    except ImportError:
        have_gpu = False
    targets = info["compute_capabilities"]
    if not have_gpu:
        raise MmcError(f"this engine runs on an NVIDIA GPU of compute capability {', '.join(targets)}; "
                       "no CUDA GPU is available here")
    major, minor = torch.cuda.get_device_capability()
    here = f"{major}.{minor}"
    if here not in targets:
        raise MmcError(f"this engine was built for compute capability {', '.join(targets)} and this GPU "
                       f"({torch.cuda.get_device_name()}) is {here}: rebuild it with --trt-capability {here}"
                       + (" (TensorRT-RTX cannot run on it: use full TensorRT)"
                          if flavour == "tensorrt_rtx" and here not in RTX_CAPABILITIES else ""))
    return trt, torch.cuda.current_device()
