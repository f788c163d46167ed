"""The cuda target (mmc's own engine) on the CPU with the reference kernels: the plan compiler's
output (placement, liveness, precision of weights), the engine format, and generation with the
static KV cache against the ONNX Runtime target — greedy tokens identical in fp32, for text,
an image and a left-padded batch. The plugins' Triton kernels run here too, under Triton's
interpreter (kernels="triton"), and must give the same tokens. Weight-only int8 / int4 engines
run their GEMMs from the stored codes. GPU runs (compiled kernels, CUDA graphs) are in
tests/test_cuda_gpu.py, run by tools/gpu_check.sh."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import assert_same_tokens, needs_interpreted_triton, run_mmc


@pytest.fixture(scope="module")
def cuda_fp32(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "tiny-cuda-fp32.mmc"
    run_mmc("compile", tiny_dir, "--target", "cuda", "--precision", "fp32", "-o", out, "-q")
    return out


def test_plan_placement_liveness_and_manifest(cuda_fp32):
    man = json.loads((cuda_fp32 / "manifest.json").read_text())
    assert man["target"] == "cuda" and man["target_info"] == {"runtime": "mmc-cuda", "precision": "fp32", "plan_format": 2}
    dec = man["components"]["decoder"]
    plan = json.loads((cuda_fp32 / dec["plan"]).read_text())
    steps = plan["steps"]
    assert dec["ops"]["mmc.Attention"] == 2 and dec["host_steps"] > 0
    # Shape and what reads only shapes run on the host; everything reading data on the device
    place = {i["name"]: "device" for i in plan["inputs"]} | {n: c["place"] for n, c in plan["constants"].items()}
    for s in steps:
        want = "host" if s["op"] == "Shape" or all(place[n] == "host" for n in s["inputs"] if n) else "device"
        assert s["place"] == want, s["name"]
        place.update({o: s["place"] for o in s["outputs"] if o})
    assert all(s["place"] == "device" for s in steps if s["domain"] == "mmc" or s["op"] == "MatMul")
    # liveness: a value is freed once, after its last reader, never a graph output
    outputs = {o["name"] for o in plan["outputs"]}
    freed = {}
    for i, s in enumerate(steps):
        for n in s["free"]:
            assert n not in freed and n not in outputs
            freed[n] = i
    for i, s in enumerate(steps):
        assert all(freed.get(n, len(steps)) >= i for n in s["inputs"] if n)
    assert len(freed) > len(steps) // 2
    # both cache attentions are static-cache candidates
    assert [c["past"] for c in plan["caches"]] == [["past_key_0", "past_value_0"], ["past_key_1", "past_value_1"]]


def test_greedy_tokens_identical_to_onnx_runtime(cuda_fp32, engine_all, images):
    from mmc.runtime import load

    cuda, ort = load(cuda_fp32, device="cpu", max_seq_len=256), load(engine_all, device="cpu")
    assert_same_tokens(cuda, ort, images["odd"], 12, batch=True, full_length=True)


def test_prefill_buckets_pad_the_prompt_exactly(cuda_fp32, engine_all, images):
    """What the GPU does for its prefill graphs, on the CPU: the prompt left-padded to its length
    bucket (masked pad slots that stay in the cache) gives the ORT target's tokens, for text, an
    image and a left-padded batch, and a sequence still reaches max_seq_len itself."""
    from mmc.runtime import load
    from mmc.runtime.cuda.engine import pad_room, prefill_bucket

    assert [prefill_bucket(s) for s in (1, 64, 65, 1024, 1025, 4000)] == [64, 64, 128, 1024, 1280, 4096]
    assert pad_room(1025) == 63 and pad_room(1026) == 255
    padded, ort = load(cuda_fp32, device="cpu", max_seq_len=96, prefill_buckets=True), load(engine_all, device="cpu")
    assert padded.cache_len == 96 + 63
    assert_same_tokens(padded, ort, images["odd"], 12, batch=True)
    ids = padded.processor.prepare("The quick brown", []).input_ids
    _, state = padded._prefill_logits(padded.embed(ids)[None].copy(), _positions(len(ids)), _ones(len(ids)))
    assert state["pad"] == 64 - len(ids)
    n = 96 - len(ids) + 1  # the last decode step sees max_seq_len tokens
    assert padded.generate("The quick brown", max_new_tokens=n).token_ids == \
        ort.generate("The quick brown", max_new_tokens=n).token_ids


def _positions(n):
    import numpy as np

    return np.broadcast_to(np.arange(n), (3, 1, n)).copy()


def _ones(n):
    import numpy as np

    return np.ones((1, n), dtype=np.int64)


def test_max_seq_len_is_enforced(cuda_fp32):
    from mmc.errors import MmcError
    from mmc.runtime import load

    eng = load(cuda_fp32, device="cpu", max_seq_len=12)
    with pytest.raises(MmcError, match="max_seq_len 12"):
        eng.generate("The quick brown fox jumps over the lazy dog", max_new_tokens=20)


def test_unknown_kernels_is_one_clear_error(cuda_fp32):
    from mmc.errors import MmcError
    from mmc.runtime import load

    with pytest.raises(MmcError, match="unknown kernels 'fast'"):
        load(cuda_fp32, device="cpu", kernels="fast")


def test_bf16_engine_generates_the_trained_phrase(tiny_dir, tmp_path, engine_all):
    out = tmp_path / "bf16.mmc"
    run_mmc("compile", tiny_dir, "--target", "cuda", "-o", out, "-q")
    man = json.loads((out / "manifest.json").read_text())
    plan = json.loads((out / man["components"]["decoder"]["plan"]).read_text())
    dtypes = {c["dtype"] for c in plan["constants"].values() if c["place"] == "device"}
    assert "bfloat16" in dtypes  # GEMM and norm weights in the engine precision
    proc = run_mmc("run", out, "--prompt", "The quick brown", "--max-new-tokens", "8", "--device", "cpu", "--json")
    ref = run_mmc("run", engine_all, "--prompt", "The quick brown", "--max-new-tokens", "8", "--json")
    assert json.loads(proc.stdout)["text"] == json.loads(ref.stdout)["text"]


def test_runtime_loads_plans_without_the_compiler(cuda_fp32):
    code = (
        "import sys\n"
        "from mmc.runtime import load\n"
        f"e = load({str(cuda_fp32)!r}, device='cpu', max_seq_len=64)\n"
        "assert e.generate('The quick brown', max_new_tokens=3).token_ids\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['mmc', 'api'], ['mmc', 'plan'], ['mmc', 'passes'],"
        " ['mmc', 'pass_manager'], ['mmc', 'lowering'])]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _plan(engine, comp="decoder"):
    man = json.loads((engine / "manifest.json").read_text())
    return json.loads((engine / man["components"][comp]["plan"]).read_text())


def test_prefill_projects_only_the_last_position(cuda_fp32):
    plan = _plan(cuda_fp32)
    assert plan["rewrites"]["last_logits"] is True
    logits = next(o for o in plan["outputs"] if o["name"] == "logits")
    assert logits["shape"][1] == 1  # [B, 1, V]
    assert _plan(cuda_fp32, "vision")["rewrites"]["last_logits"] is False


def test_float_gemms_become_linear_with_their_bias(cuda_fp32):
    """Every float GEMM with a constant weight is an mmc.Linear (W stored [N, K]), a constant bias
    taken into it (the qkv projections), the norms and SwiGLUs that alone feed one folded in; the
    tokens are checked by the tests above."""
    for comp in ("decoder", "vision"):
        plan = _plan(cuda_fp32, comp)
        consts = plan["constants"]
        linears = [s for s in plan["steps"] if s["op"] == "Linear"]
        assert plan["rewrites"]["linear"] == len(linears) > 0 and plan["rewrites"]["weight_only"] == 0
        assert not [s for s in plan["steps"] if s["op"] == "MatMul" and s["inputs"][1] in consts]
        made = {o: s for s in linears for o in s["outputs"]}
        for s in plan["steps"]:  # no constant bias is added to a Linear's result afterwards
            if s["op"] == "Add" and any(i in made for i in s["inputs"]):
                assert not any(i in consts and len(consts[i]["shape"]) == 1 for i in s["inputs"]), s["name"]
        for s in linears:
            n, k = consts[s["inputs"][1]]["shape"]  # nn.Linear's layout
            if len(s["inputs"]) > 2 and s["inputs"][2]:
                assert consts[s["inputs"][2]]["shape"] == [n]
    decoder = _plan(cuda_fp32)
    biased = [s for s in decoder["steps"] if s["op"] == "Linear" and len(s["inputs"]) > 2 and s["inputs"][2]]
    assert len(biased) == 2  # the merged qkv projection of each of the 2 layers
    # each layer's input norm, post-attention norm and SwiGLU run inside the GEMM they feed (gemm-prologue)
    folded = [s["attrs"].get("prologue") for s in decoder["steps"] if s["op"] == "Linear"]
    assert decoder["rewrites"]["gemm_prologue"] == 6
    assert sorted(p for p in folded if p) == ["rms", "skip_rms", "skip_rms", "skip_rms", "swiglu", "swiglu"]



def test_constant_index_gathers_are_views(cuda_fp32):
    """A Gather of one constant index (M-RoPE picks its sections so, six per decode step) carries
    the index in the plan and runs as a view of its input: no kernel, the values of the general
    Gather (negative indices too)."""
    import numpy as np
    import torch

    from mmc.runtime.cuda.onnx_ops import OPS

    plan = _plan(cuda_fp32)
    picks = [s for s in plan["steps"] if s["op"] == "Gather" and "_index" in s["attrs"]]
    assert len(picks) >= 6 and all(plan["constants"][s["inputs"][1]]["shape"] == [] for s in picks)
    others = [s for s in plan["steps"] if s["op"] == "Gather" and "_index" not in s["attrs"]]
    assert all(plan["constants"].get(s["inputs"][1], {"shape": [1]})["shape"] != [] for s in others)
    x = torch.randn(3, 4, 5)
    for axis in (0, 1, -1):
        for i in (0, 2, -1):
            idx = torch.tensor(i)
            (want,) = OPS["Gather"]([x, idx], {"axis": axis})
            (got,) = OPS["Gather"]([x, idx], {"axis": axis, "_index": i})
            assert got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_rotary_folds_into_the_decoder_attentions(cuda_fp32):
    """rope-attention: each decoder attention takes the tables (inputs 8, 9) instead of rotated
    q/k, so no RotaryEmbedding step is left there; the vision tower's rotary (layout snd, read
    through a Transpose) stays. The tokens are checked by the tests above and below."""
    dec = _plan(cuda_fp32)
    attn = [s for s in dec["steps"] if s["op"] == "Attention"]
    assert dec["rewrites"]["rope_attention"] == len(attn) == 2
    assert not [s for s in dec["steps"] if s["op"] == "RotaryEmbedding"]
    for s in attn:
        assert len(s["inputs"]) == 10 and all(s["inputs"][8:]) and s["attrs"]["rotary_dim"] == 0
    vis = _plan(cuda_fp32, "vision")
    assert vis["rewrites"]["rope_attention"] == 0 and [s for s in vis["steps"] if s["op"] == "RotaryEmbedding"]


def test_rope_attention_needs_sole_readers_and_one_table():
    """Must not fire: a rotated q that another node also reads, or q and k rotated by different
    tables."""
    import numpy as np
    import onnx_graphsurgeon as gs

    from mmc.plan_rewrites import rope_attention

    def graph(extra_reader: bool, same_tables: bool):
        f = np.float32
        q, k, v = (gs.Variable(n, f, [1, 2, 3, 4]) for n in "qkv")
        cos, sin, cos2 = (gs.Variable(n, f, [1, 3, 4]) for n in ("cos", "sin", "cos2"))
        rq, rk, y = (gs.Variable(n, f, [1, 2, 3, 4]) for n in ("rq", "rk", "y"))
        nodes = [gs.Node("RotaryEmbedding", "rope_q", {"layout": "bnsd"}, [q, cos, sin], [rq], domain="mmc"),
                 gs.Node("RotaryEmbedding", "rope_k", {"layout": "bnsd"}, [k, cos if same_tables else cos2, sin], [rk],
                         domain="mmc"),
                 gs.Node("Attention", "attn", {"num_heads": 2, "kv_heads": 2, "scale": 0.5}, [rq, rk, v], [y], domain="mmc")]
        outs = [y]
        if extra_reader:
            z = gs.Variable("z", f, [1, 2, 3, 4])
            nodes.append(gs.Node("Neg", "neg", {}, [rq], [z]))
            outs.append(z)
        return gs.Graph(nodes=nodes, inputs=[q, k, v, cos, sin, cos2], outputs=outs, opset=23)

    assert rope_attention(graph(False, True)) == 1
    assert rope_attention(graph(True, True)) == 0
    assert rope_attention(graph(False, False)) == 0


def test_gemm_prologue_folds_sole_producers_into_gemms():
    """gemm-prologue folds RMSNorm, SkipRMSNorm (its sum kept as the GEMM's second output) and the
    packed SwiGLU into the int8 or float GEMM they alone feed (after a float GEMM's bias). Must not
    fire: a norm output that another node reads too, a SkipRMSNorm with a bias, an int4 GEMM, a
    norm before a wide GEMM (N > 4K), a norm before a float GEMM with K > NORM_FOLD_MAX_K."""
    import numpy as np
    import onnx_graphsurgeon as gs

    from mmc.plan_rewrites import NORM_FOLD_MAX_K, gemm_prologue

    f, n = np.float32, 4

    def gemm(name, x, k, bits=8, n=n):
        y = gs.Variable(f"{name}_y", f, [1, 1, n])
        if bits == 0:  # mmc.Linear with a bias
            ins = [x, gs.Constant(f"{name}_w", np.ones((n, k), f)), gs.Constant(f"{name}_b", np.ones(n, f))]
            return gs.Node("Linear", name, {}, ins, [y], domain="mmc"), y
        w = gs.Constant(f"{name}_w", np.ones((n, k) if bits == 8 else (n, k // 2), np.int8 if bits == 8 else np.uint8))
        s = gs.Constant(f"{name}_s", np.ones(n if bits == 8 else (n, 1), f))
        attrs = {"bits": bits, "k": k} | ({} if bits == 8 else {"group_size": k})
        return gs.Node("WeightOnlyMatMul", name, attrs, [x, w, s], [y], domain="mmc"), y

    def graph(variant):
        k = NORM_FOLD_MAX_K + 2 if variant == "float_long_k" else 8
        a, r = gs.Variable("a", f, [1, 1, k]), gs.Variable("r", f, [1, 1, k])
        gu = gs.Variable("gu", f, [1, 1, 2 * k])
        g = gs.Constant("g", np.ones(k, f))
        xn, s, h = (gs.Variable(t, f, [1, 1, k]) for t in ("xn", "s", "h"))
        nodes, outs = [], []
        if variant in ("rms", "shared", "int4", "wide", "float", "float_long_k"):
            nodes.append(gs.Node("RMSNorm", "norm", {"epsilon": 1e-6}, [a, g], [xn], domain="mmc"))
        elif variant in ("skip", "skip_bias"):
            ins = [a, r, g] + ([gs.Constant("b", np.ones(k, f))] if variant == "skip_bias" else [])
            nodes.append(gs.Node("SkipRMSNorm", "norm", {"epsilon": 1e-6}, ins, [xn, s], domain="mmc"))
            outs.append(s)
        else:
            nodes.append(gs.Node("SwiGLU", "act", {"activation": "silu"}, [gu], [xn], domain="mmc"))
        bits = 4 if variant == "int4" else 0 if variant.startswith("float") else 8
        node, y = gemm("gemm", xn, k, bits, 4 * k + 1 if variant == "wide" else n)
        nodes.append(node)
        outs.append(y)
        if variant == "shared":
            nodes.append(gs.Node("Neg", "neg", {}, [xn], [h]))
            outs.append(h)
        return gs.Graph(nodes=nodes, inputs=[a, r, gu], outputs=outs, opset=23)

    for variant, kind in (("rms", "rms"), ("skip", "skip_rms"), ("swiglu", "swiglu"), ("float", "rms")):
        gr = graph(variant)
        assert gemm_prologue(gr) == 1, variant
        (node,) = gr.nodes
        at = 3 if node.op == "Linear" else 4
        assert node.attrs["prologue"] == kind and node.inputs[at - 1].name == ("gemm_b" if at == 3 else "")
        assert [t.name for t in node.inputs[at:]] == {"rms": ["g"], "skip_rms": ["g", "r"], "swiglu": []}[kind]
        assert node.inputs[0].name == ("gu" if kind == "swiglu" else "a")
        assert [t.name for t in node.outputs] == (["gemm_y", "s"] if kind == "skip_rms" else ["gemm_y"])
    for variant in ("shared", "skip_bias", "int4", "wide", "float_long_k"):
        assert gemm_prologue(graph(variant)) == 0, variant


def test_triton_kernels_interpreted_match_onnx_runtime(cuda_fp32, engine_all, images):
    """The same plan with every mmc op, the static-cache decode attention and the sampling on the
    plugins' Triton kernels (interpreted on this CPU): the greedy tokens of the ORT target."""
    needs_interpreted_triton()
    from mmc.runtime import load

    tri, ort = load(cuda_fp32, device="cpu", max_seq_len=128, kernels="triton"), load(engine_all, device="cpu")
    assert tri.decoder.triton
    assert_same_tokens(tri, ort, images["small"], 8)
    a = tri.generate("The quick brown", max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, seed=3)
    b = tri.generate("The quick brown", max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6  # seeded: reproducible


@pytest.mark.parametrize("mode", ["--int8", "--int4"])
def test_weight_only_engines_run_from_codes(tiny_dir, tmp_path, mode):
    """--int8 / --int4 cuda engines: every quantized GEMM becomes mmc.WeightOnlyMatMul on the
    stored codes (no DequantizeLinear left), and greedy tokens equal the ORT engine of the same
    quantization (MatMulNBits); the Triton kernel (interpreted) gives the torch path's tokens."""
    from mmc.runtime import load

    cuda, ort = tmp_path / "q.cuda.mmc", tmp_path / "q.ort.mmc"
    run_mmc("compile", tiny_dir, mode, "--target", "cuda", "--precision", "fp32", "-o", cuda, "-q")
    run_mmc("compile", tiny_dir, mode, "-o", ort, "-q")
    plan = _plan(cuda)
    ops = [s["op"] for s in plan["steps"]]
    assert plan["rewrites"]["weight_only"] == ops.count("WeightOnlyMatMul") >= 4 and "DequantizeLinear" not in ops
    woq = next(s for s in plan["steps"] if s["op"] == "WeightOnlyMatMul")
    w = plan["constants"][woq["inputs"][1]]
    assert w["place"] == "device" and w["dtype"] == ("int8" if mode == "--int8" else "uint8")
    biased = [s for s in plan["steps"] if s["op"] == "WeightOnlyMatMul" and len(s["inputs"]) > 3 and s["inputs"][3]]
    assert len(biased) == 2  # each layer's qkv projection takes its bias
    # int8: each layer's input norm, post-attention norm and SwiGLU run inside the GEMM they feed
    folded = [s["attrs"].get("prologue") for s in plan["steps"] if s["op"] == "WeightOnlyMatMul"]
    assert plan["rewrites"]["gemm_prologue"] == (6 if mode == "--int8" else 0)
    if mode == "--int8":  # layer 0 starts from the embeddings (RMSNorm); layer 1 adds its residual first
        assert sorted(p for p in folded if p) == ["rms", "skip_rms", "skip_rms", "skip_rms", "swiglu", "swiglu"]
    assert plan["constants"][biased[0]["inputs"][3]]["shape"] == [plan["constants"][biased[0]["inputs"][1]]["shape"][0]]
    torch_path = load(cuda, device="cpu", max_seq_len=64, kernels="torch")
    want = load(ort, device="cpu").generate("The quick brown", max_new_tokens=8).token_ids
    assert torch_path.generate("The quick brown", max_new_tokens=8).token_ids == want
    needs_interpreted_triton()
    tri = load(cuda, device="cpu", max_seq_len=64, kernels="triton")
    assert tri.generate("The quick brown", max_new_tokens=8).token_ids == want


def test_quantized_lm_head_is_opt_in(tiny_dir, tmp_path):
    """--int8 --quantize-lm-head: the logits GEMM is an int8 mmc.WeightOnlyMatMul too (without the
    flag it stays a float mmc.Linear: test_weight_only_engines_run_from_codes), the manifest keeps
    nothing float but the patch embedding, and the greedy tokens equal the ORT engine of the same
    flags (MatMulNBits) on the torch path and the interpreted Triton kernels."""
    from mmc.runtime import load

    cuda, ort = tmp_path / "q.cuda.mmc", tmp_path / "q.ort.mmc"
    flags = ("--int8", "--quantize-lm-head", "--no-accuracy-report", "-q")
    run_mmc("compile", tiny_dir, *flags, "--target", "cuda", "--precision", "fp32", "-o", cuda)
    run_mmc("compile", tiny_dir, *flags, "-o", ort)
    plan = _plan(cuda)
    logits = next(s for s in plan["steps"] if "logits" in s["outputs"])
    assert logits["op"] == "WeightOnlyMatMul" and plan["constants"][logits["inputs"][1]]["dtype"] == "int8"
    assert not [s for s in plan["steps"] if s["op"] == "Linear"]
    kept = json.loads((cuda / "manifest.json").read_text())["quantization"]["weight_bytes"]["kept_float"]
    assert not any(k.startswith("lm_head") for k in kept)
    want = load(ort, device="cpu").generate("The quick brown", max_new_tokens=8).token_ids
    assert load(cuda, device="cpu", max_seq_len=64, kernels="torch").generate(
        "The quick brown", max_new_tokens=8).token_ids == want
    needs_interpreted_triton()
    tri = load(cuda, device="cpu", max_seq_len=64, kernels="triton")
    assert tri.generate("The quick brown", max_new_tokens=8).token_ids == want


def test_a_plan_of_another_format_is_refused(cuda_fp32, tmp_path):
    """A cuda engine whose plan has another format (format 1 kept mmc.Linear's W as [K, N], which
    this runtime would read transposed) is refused with one line naming the format, not run."""
    import shutil

    from mmc.runtime import load
    from mmc.runtime.engine_format import CUDA_PLAN_FORMAT, EngineError

    old = tmp_path / "old.mmc"
    shutil.copytree(cuda_fp32, old)
    man = json.loads((old / "manifest.json").read_text())
    path = old / man["components"]["decoder"]["plan"]
    plan = json.loads(path.read_text())
    assert plan["format"] == CUDA_PLAN_FORMAT
    path.write_text(json.dumps(dict(plan, format=1)))
    with pytest.raises(EngineError, match="plan format 1 of 'decoder' is not 2 .*compile it again"):
        load(old, device="cpu", verify=False)
