"""The activation arena (runtime/cuda/memory_plan.py and the executor's use of it): offsets never
overlap for values alive at the same time, the arena is between the peak of live bytes and the sum
of all buffers, views keep their base alive, graph outputs stay out; on a real plan the values
the executor places in the arena are views of one buffer and the results are bit-identical to
running without it."""

from __future__ import annotations

import random

import pytest
from conftest import needs_interpreted_triton, run_mmc

from mmc.runtime.cuda.memory_plan import ALIGN, Buffer, lifetimes, plan_offsets


def _check(buffers, plan):
    for b in buffers:
        assert plan.offsets[b.name] % ALIGN == 0
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            if a.start <= b.end and b.start <= a.end:  # alive together: disjoint memory
                oa, ob = plan.offsets[a.name], plan.offsets[b.name]
                assert oa + a.nbytes <= ob or ob + b.nbytes <= oa, (a, b, oa, ob)
    assert plan.peak_live_bytes <= plan.arena_bytes <= plan.total_bytes
    assert all(plan.offsets[b.name] + b.nbytes <= plan.arena_bytes for b in buffers)


@pytest.mark.parametrize("seed", range(20))
def test_random_lifetimes_never_share_live_memory(seed):
    rng = random.Random(seed)
    buffers = []
    for i in range(60):
        start = rng.randrange(100)
        buffers.append(Buffer(f"v{i}", rng.choice([1, 100, 256, 4096, 70000, 1 << 20]), start, start + rng.randrange(20)))
    plan = plan_offsets(buffers)
    _check(buffers, plan)
    assert plan.arena_bytes < plan.total_bytes  # lifetimes end, so memory is reused


def test_a_chain_needs_only_two_slots():
    # x0 -> x1 -> ... each read only by the next step: the arena holds two at a time
    buffers = [Buffer(f"x{i}", 1000, i, i + 1) for i in range(10)]
    plan = plan_offsets(buffers)
    _check(buffers, plan)
    assert plan.arena_bytes == plan.peak_live_bytes == 2 * 1024


def test_views_extend_their_base_and_outputs_stay_out():
    events = [(0, "a", 4096, None), (1, "a_view", 0, "a"), (1, "b", 4096, None), (2, "c", 4096, None),
              (3, "d", 512, None), (4, "d_view", 0, "d"), (5, "external_view", 0, "weights")]
    reads = {"a": 1, "a_view": 6, "b": 2, "c": 3, "d": 4}
    bufs = {b.name: b for b in lifetimes(events, reads, keep={"d_view"})}
    assert set(bufs) == {"a", "b", "c"}  # d is read after the run through its view; views of
    assert (bufs["a"].start, bufs["a"].end) == (0, 6)  # unplanned memory are not buffers
    plan = plan_offsets(list(bufs.values()))
    _check(list(bufs.values()), plan)
    assert plan.arena_bytes == 3 * 4096  # a lives across b and c


@pytest.fixture(scope="module")
def cuda_bf16(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("arena") / "tiny-cuda-bf16.mmc"
    run_mmc("compile", tiny_dir, "--target", "cuda", "-o", out, "-q")
    return out


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_executor_runs_from_the_arena_bit_identically(cuda_bf16, kernels):
    """Prefill and a static-cache decode step of the tiny decoder, with and without the arena: the
    same logits bit for bit; the planned values are views into one buffer; the arena is smaller
    than the values it holds. With the Triton kernels (interpreted here) the mmc ops' results are
    planned too."""
    if kernels == "triton":
        needs_interpreted_triton()
    import numpy as np
    import torch

    from mmc.runtime import load

    runs = {}
    for arena in (True, False):
        eng = load(cuda_bf16, device="cpu", max_seq_len=32, kernels=kernels)
        eng.decoder.use_arena = arena
        ids = eng.processor.prepare("The quick brown fox", []).input_ids
        n = len(ids)
        pos = np.broadcast_to(np.arange(n), (3, 1, n)).copy()
        logits, state = eng._prefill_logits(eng.embed(ids)[None].copy(), pos, np.ones((1, n), dtype=np.int64))
        out = [logits.clone()]
        for step in range(3):  # the second and third run of each bucket use the plan
            tok = out[-1].argmax(-1).numpy()
            p = np.full((3, 1, 1), n + step, dtype=np.int64)
            out.append(eng._decode_logits(tok, p, np.ones((1, n + step + 1), dtype=np.int64), state)[0].clone())
        logits2, _ = eng._prefill_logits(eng.embed(ids)[None].copy(), pos, np.ones((1, n), dtype=np.int64))
        out.append(logits2.clone())
        runs[arena] = (eng, out)
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a, b)
    eng = runs[True][0]
    reports = eng.decoder.memory()
    assert len(reports) == 2  # prefill and decode buckets
    for r in reports:
        assert r["values"] >= 10 and r["peak_live_bytes"] <= r["arena_bytes"] < r["total_bytes"]
    planned = [b for b in eng.decoder._buckets.values() if "arena" in b]
    for bucket in planned:  # one buffer per bucket
        assert len({v.untyped_storage().data_ptr() for v in bucket["arena"].values()}) == 1
    ops = {s["op"] for b in planned for n in b["arena"] for s in eng.decoder.steps if n in s["outputs"]}
    assert "Linear" in ops
    if kernels == "triton":
        # the rotary runs inside Attention, the other norms and the SwiGLUs inside the GEMMs they feed
        assert {"SkipRMSNorm", "Attention"} <= ops
    assert runs[False][0].decoder.memory() == []
