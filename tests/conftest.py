"""Shared fixtures: a tiny Qwen2.5-VL checkpoint saved with save_pretrained, test images, one
compiled engine (`--passes all`), the transformers model on the same weights, and a helper that
runs the real `mmc` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # the plugins' Triton kernels run interpreted on the CPU (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def assert_same_tokens(a, b, image, max_new_tokens: int, batch: bool = False, full_length: bool = False) -> None:
    """Engines `a` and `b` generate the same greedy tokens for a text prompt and a prompt with
    `image` (all `max_new_tokens` of them with full_length) and, with batch, for a left-padded
    batch of two prompts (8 tokens)."""
    for prompt, imgs in (("The quick brown", None), ("Describe the picture.", [image])):
        x = a.generate(prompt, images=imgs, max_new_tokens=max_new_tokens).token_ids
        assert x == b.generate(prompt, images=imgs, max_new_tokens=max_new_tokens).token_ids, prompt
        assert not full_length or len(x) == max_new_tokens
    if batch:
        prompts = ["Hi", "The quick brown fox jumps over"]
        assert [r.token_ids for r in a.generate(prompts, max_new_tokens=8)] == \
            [r.token_ids for r in b.generate(prompts, max_new_tokens=8)]


def needs_interpreted_triton() -> None:
    """Skip a test that runs the Triton kernels on CPU tensors unless they run interpreted (on a
    GPU machine they are compiled for the GPU; tests/test_cuda_gpu.py covers them there)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set when there is no GPU)")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["MMC_CACHE"] = str(tmp_path_factory.mktemp("mmc-cache"))


def run_mmc(*args, check_ok: bool = True, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mmc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ), timeout=600)
    if check_ok and proc.returncode != 0:
        raise AssertionError(f"mmc {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny preset written the way users' checkpoints are: save_pretrained of a random-init model."""
    from mmc.models.qwen2_5_vl.presets import build_checkpoint

    return build_checkpoint("tiny-qwen2.5-vl", tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """170x250 resizes to 168x252 px = 12x18 patches: not a multiple of the 112 px window."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    out = {}
    for name, (h, w) in {"odd": (170, 250), "small": (120, 90)}.items():
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{name}.png")
        out[name] = d / f"{name}.png"
    return out


@pytest.fixture(scope="session")
def engine_all(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny-all.mmc"
    dump = out.parent / "dump-all"
    run_mmc("compile", tiny_dir, "--passes", "all", "-o", out, "--dump-dir", dump, "--verify-each")
    return out


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def lm_dir(tiny_dir, tmp_path_factory):
    """lm_dir(family) -> a tiny text-only checkpoint of that transformers family (built once)."""
    from lm_checkpoints import build

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(family, tmp_path_factory.mktemp("lm") / family, tiny_dir)
        return built[family]

    return get
