"""Run by tests/test_kernels.py in a process without TRITON_INTERPRET (the interpreter cannot
compile): the decode-path kernels compiled for sm_90 with programmatic dependent launch, and what
each does before griddepcontrol.wait, as JSON lines {kernel, loads (the parameters each global
load reads through), allowed, writes (stores / atomics)}. Needs no GPU."""

from __future__ import annotations

import json
import re

import triton


def _pre_wait_loads(kernel, constexprs: dict, ptrs: dict, floats: set) -> tuple[list, set]:
    """Compile `kernel` for sm_90 (no GPU needed) and follow its PTX up to griddepcontrol.wait:
    (the parameters each global load before the wait reads through, the opcodes of any store
    or atomic before it). Registers are traced to the kernel parameters they derive from."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "*bf16") if n.endswith("_ptr")
           else "fp32" if n in floats else "i32" for n in names}
    ptx = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    body = [ln.split("//")[0].strip() for ln in ptx.split("{", 1)[1].splitlines()]
    wait = next(i for i, ln in enumerate(body) if ln.startswith("griddepcontrol.wait"))
    assert [ln for ln in body if ln.startswith("griddepcontrol")] == ["griddepcontrol.wait;", "griddepcontrol.launch_dependents;"]
    deps: dict[str, set] = {}
    loads, writes = [], set()
    for ln in body[:wait]:
        ln = re.sub(r"^@!?%p\d+\s+", "", ln)
        if not ln or ln.startswith((".", "$")):
            continue
        op, _, rest = ln.partition(" ")
        regs = re.findall(r"%[a-z]+\d+", rest)
        if op.startswith(("st.global", "atom", "red")):
            writes.add(op)
        elif op.startswith("ld.param"):
            name = names[int(re.search(r"_param_(\d+)", rest).group(1))]
            deps[regs[0]] = {name} if name.endswith("_ptr") else set()  # (sizes, strides: not memory)
        elif op.startswith("ld.global"):
            addr = re.search(r"\[\s*(%rd\d+)", rest).group(1)
            loads.append(deps.get(addr, set()))
        elif regs:
            deps[regs[0]] = set().union(*(deps.get(r, set()) for r in regs[1:]))
    return loads, writes


def main() -> None:
    from mmc.plugins.attention.kernels import _decode_kernel
    from mmc.plugins.linear.gemv import _gemv_kernel
    from mmc.plugins.norms.kernels import _rms_norm_kernel
    from mmc.plugins.swiglu.kernels import _swiglu_kernel

    gemv_cx = {"PRO": 2, "ACT": 0, "QUANT": True, "HAS_BIAS": True, "SPLIT": True, "BLOCK_N": 16,
               "BLOCK_K": 512, "NORM": 1024, "PDL": 2}
    cases = [
        (_gemv_kernel, gemv_cx, {"w_ptr": "*i8", "s_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32"},
         {"eps"}, {"w_ptr"}),
        (_rms_norm_kernel, {"HAS_SKIP": True, "HAS_BIAS": False, "BLOCK": 2048, "PDL": 2}, {}, {"eps"}, {"w_ptr"}),
        (_swiglu_kernel, {"ACT": 0, "BLOCK": 1024, "PDL": 2}, {}, set(), set()),
        (_decode_kernel, {"MASK": 1, "QUANT": False, "NEW": True, "ROPE": True, "BLOCK_G": 16, "BLOCK_N": 32,
                          "BLOCK_D": 128, "PDL": 2},
         {"cs_ptr": "*fp32", "sn_ptr": "*fp32", "pos_ptr": "*i64", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
          "part_ptr": "*fp32", "ml_ptr": "*fp32", "count_ptr": "*i32"}, {"scale"}, set()),
    ]
    for kernel, cx, ptrs, floats, allowed in cases:
        loads, writes = _pre_wait_loads(kernel, cx, ptrs, floats)
        print(json.dumps({"kernel": kernel.__name__, "loads": [sorted(x) for x in loads], "allowed": sorted(allowed),
                          "writes": sorted(writes)}))


if __name__ == "__main__":
    main()
