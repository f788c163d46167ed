"""The cuda target on a CUDA GPU (skipped without one; run by tools/gpu_check.sh on the GPU
machine): greedy tokens identical to the ONNX Runtime target in fp32 with the decode step
replayed from a CUDA graph, the graph replay equal to eager execution, and a bf16 engine."""

from __future__ import annotations

import pytest
from conftest import assert_same_tokens, run_mmc

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_engine(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "tiny-cuda-fp32.mmc"
    run_mmc("compile", tiny_dir, "--target", "cuda", "--precision", "fp32", "-o", out, "-q")
    return out


def test_gpu_fp32_greedy_tokens_identical_to_onnx_runtime(cuda_engine, engine_all, images):
    from mmc.runtime import load

    gpu, ort = load(cuda_engine, device="cuda", max_seq_len=256), load(engine_all, device="cpu")
    assert gpu.cuda_graphs
    assert_same_tokens(gpu, ort, images["odd"], 16, batch=True)


def test_cuda_graph_replay_equals_eager(cuda_engine, images):
    """Vision (a graph per image shape), prefill (a graph per padded length bucket) and decode
    replayed from graphs give the eager engine's tokens; a second prompt of the same bucket and
    the same image shape reuses the graphs."""
    from mmc.runtime import load

    graphs = load(cuda_engine, device="cuda", max_seq_len=128)
    eager = load(cuda_engine, device="cuda", max_seq_len=128, cuda_graphs=False)
    assert graphs.prefill_buckets and not eager.prefill_buckets
    for prompt in ("The quick brown", "Vision language models"):
        assert graphs.generate(prompt, max_new_tokens=20).token_ids == eager.generate(prompt, max_new_tokens=20).token_ids
    assert len(graphs._graphed["decoder"].graphs) == 1  # both prompts pad to 64
    for prompt in ("Describe the picture.", "What is in this image?"):
        assert graphs.generate(prompt, images=[images["odd"]], max_new_tokens=12).token_ids == \
            eager.generate(prompt, images=[images["odd"]], max_new_tokens=12).token_ids
    assert len(graphs._graphed["vision"].graphs) == 1
    batch = ["Hi", "The quick brown fox jumps over"]
    assert [r.token_ids for r in graphs.generate(batch, max_new_tokens=8)] == \
        [r.token_ids for r in eager.generate(batch, max_new_tokens=8)]
    # the graphs ran from the activation arena (Triton kernels and cuBLAS writing into it)
    assert graphs.decoder.triton and all(m["values"] > 10 for m in graphs.decoder.memory() + graphs.vision.memory())
    plain = load(cuda_engine, device="cuda", max_seq_len=128)
    plain.decoder.use_arena = plain.vision.use_arena = False
    assert_same_tokens(graphs, plain, images["odd"], 12)
    assert plain.decoder.memory() == []


def test_gpu_bf16_engine(tiny_dir, tmp_path, engine_all):
    from mmc.runtime import load

    out = tmp_path / "bf16.mmc"
    run_mmc("compile", tiny_dir, "--target", "cuda", "-o", out, "-q")
    text = load(out, device="cuda").generate("The quick brown", max_new_tokens=8).text
    assert text == load(engine_all, device="cpu").generate("The quick brown", max_new_tokens=8).text


def test_gpu_triton_and_torch_kernels_agree(cuda_engine, images):
    """The Triton path (compiled kernels) and the torch path give the same fp32 tokens on the GPU."""
    from mmc.runtime import load

    tri = load(cuda_engine, device="cuda", max_seq_len=256, kernels="triton")
    ref = load(cuda_engine, device="cuda", max_seq_len=256, kernels="torch")
    assert tri.decoder.triton and not ref.decoder.triton
    assert_same_tokens(tri, ref, images["odd"], 16)


def test_gpu_int8_weight_only_engine(tiny_dir, tmp_path):
    from mmc.runtime import load

    cuda, ort = tmp_path / "i8.cuda.mmc", tmp_path / "i8.ort.mmc"
    run_mmc("compile", tiny_dir, "--int8", "--target", "cuda", "--precision", "fp32", "-o", cuda, "-q")
    run_mmc("compile", tiny_dir, "--int8", "-o", ort, "-q")
    want = load(ort, device="cpu").generate("The quick brown", max_new_tokens=12).token_ids
    assert load(cuda, device="cuda", max_seq_len=64).generate("The quick brown", max_new_tokens=12).token_ids == want
