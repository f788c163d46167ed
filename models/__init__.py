"""Model families and presets: turn the user's MODEL argument into a checkpoint dir + adapter.

MODEL is either a Hugging Face checkpoint directory (as `save_pretrained` writes it) or a
preset name (`mmc compile --help` lists them). Presets are built locally, deterministically,
into a cache folder (`$MMC_CACHE`, default `~/.cache/mmc`) the first time they are used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmc.errors import MmcError

from .qwen2_5_vl.adapter import Qwen25VLAdapter
from .qwen2_5_vl.presets import PRESETS

FAMILIES = {"qwen2_5_vl": Qwen25VLAdapter}  # multimodal families; text-only LMs go to CausalLMAdapter
DEFAULT_PRESET = "tiny-qwen2.5-vl"
PRESET_REVISION = 1  # bump when a preset's construction changes, so caches rebuild


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def cache_dir() -> Path:
    return Path(os.environ.get("MMC_CACHE", Path.home() / ".cache" / "mmc"))


def preset_dir(name: str) -> Path:
    """Build (once) and return the checkpoint directory of preset `name`."""
    from .qwen2_5_vl.presets import build_checkpoint

    out = cache_dir() / "presets" / f"{name}-r{PRESET_REVISION}"
    if (out / "config.json").is_file() and (out / "mmc_preset.json").is_file():
        return out
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    build_checkpoint(name, tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(model: str | os.PathLike | None):
    """Return (model_dir, adapter, source_id) for a checkpoint dir or preset name."""
    model = str(model) if model is not None else DEFAULT_PRESET
    path = Path(model)
    if path.is_dir():
        model_dir, source = path, str(path.resolve())
    elif model in PRESETS:
        model_dir, source = preset_dir(model), f"preset:{model}"
    elif path.exists():
        raise MmcError(f"{model} is a file; MODEL must be a Hugging Face checkpoint directory or a preset")
    else:
        raise MmcError(f"unknown model or preset {model!r}: not a directory, and presets are "
                       f"{', '.join(PRESETS)}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise MmcError(f"{model_dir} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MmcError(f"{cfg_path} is not valid JSON: {e}") from e
    family = config.get("model_type")
    adapter_cls = FAMILIES.get(family)
    if adapter_cls is None and family in _causal_lm_types():
        from .causal_lm.adapter import CausalLMAdapter as adapter_cls
    if adapter_cls is None:
        raise MmcError(f"model type {family!r} ({cfg_path}) is not supported; supported: "
                       f"{', '.join(FAMILIES)} and text-only causal LMs that transformers loads")
    if not any(model_dir.glob("*.safetensors")):
        raise MmcError(f"{model_dir} has no *.safetensors weight files")
    return model_dir, adapter_cls(model_dir, config), source
