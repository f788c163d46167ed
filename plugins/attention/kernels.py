"""Triton kernels for mmc.Attention (the cuda target's face of plugins/attention).

    flash_attention   prefill and the vision tower: q [B, N, S, D] against k/v [B, KV, T, D],
                      tiles of BLOCK_M queries × BLOCK_N keys with an online softmax (flash-style),
                      any mask broadcastable to [B, N, S, T] (causal, padding, block-diagonal are
                      all just the mask), GQA by indexing kv head n // (N/KV)
    decode_attention  decode, one kernel per layer: split-KV over the static cache [B, KV, T_max, D]
                      — grid (B·KV, splits); each program takes the N/KV query heads of one kv
                      head over one chunk of slots (stopping at pos + 1: unwritten slots are
                      never read). It rotates q and this step's k (RoPE, fused: the rotary
                      kernels' math), the split owning slot `pos` stores this step's k/v there
                      (and every split uses them from registers), each split writes a partial
                      (max, sum, weighted values), and the last split of a (batch, kv head) to
                      count in on an atomic counter merges the partials in split order. One
                      launch instead of five (2 rotary, write, split-KV, combine).

Online softmax per row: m' = max(m, max s); p = exp(s - m'); l' = l·exp(m - m') + Σp;
acc' = acc·exp(m - m') + p·V; y = acc / l. A row with every score -inf ends with l = 0 and gives 0
(sdpa's NaN guard, `nan_to_zero`); a finite additive mask keeps the reference's semantics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmc.quantization import next_pow2

from ..rotary.kernels import rotate_rows
from ..triton_util import dot, inputs_ready, output, pdl, to

NO_MASK, ADD_MASK, BOOL_MASK = 0, 1, 2
DECODE_SPLITS = 64   # target number of splits per (batch, kv head) over the static cache


def _mask_args(mask, shape4):
    """(mask or dummy, kind, strides over [B, N, S, T]) with broadcast axes at stride 0."""
    if mask is None:
        return None, NO_MASK, (0, 0, 0, 0)
    m = mask.expand(shape4)
    return m, BOOL_MASK if mask.dtype == torch.bool else ADD_MASK, tuple(m.stride())


@triton.jit
def _online_block(q, k, v, s_mask, m_i, l_i, acc, scale):
    """One key block of the online softmax; s_mask: scores with -inf where a key must not count.
    The probabilities are rounded to V's dtype for P·V in prefill and decode alike, as flash
    attention does (on the H100, transformers' sdpa runs cuDNN's attention; tools/noise_floor.py
    measured sdpa's flash kernel at a logits cosine of 0.99956 from it, its float32 math kernel
    at 0.99892: rounding P as flash does stays closer to the reference)."""
    s = dot(q, tl.trans(k)) * scale + s_mask
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(to(p, v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _mask_scores(mask_ptr, rows, cols, valid, smt, MASK: tl.constexpr):
    """Additive scores for one tile: 0 / -inf (bool mask, padding) or the additive mask's values."""
    s = tl.where(valid, 0.0, float("-inf"))
    if MASK == 1:
        s += tl.load(mask_ptr + rows + cols * smt, mask=valid, other=0.0).to(tl.float32)
    elif MASK == 2:
        ok = tl.load(mask_ptr + rows + cols * smt, mask=valid, other=0) != 0
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _flash_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, seq_q, seq_k, heads, group, head_dim, scale,
                  sqb, sqn, sqs, skb, skn, sks, svb, svn, svs, smb, smn, sms, smt,
                  MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bn = tl.program_id(1)
    b = (bn // heads).to(tl.int64)
    n = (bn % heads).to(tl.int64)
    kvh = n // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dm = d[None, :] < head_dim
    rm = rows[:, None] < seq_q
    q = tl.load(q_ptr + b * sqb + n * sqn + rows[:, None].to(tl.int64) * sqs + d[None, :], mask=rm & dm, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mrow = mask_ptr + b * smb + n * smn + rows[:, None].to(tl.int64) * sms
    start = 0
    while start < seq_k:  # (a while loop: the interpreter cannot range() over a runtime bound)
        cols = start + tl.arange(0, BLOCK_N)
        cm = cols[:, None] < seq_k
        k = tl.load(k_ptr + b * skb + kvh * skn + cols[:, None].to(tl.int64) * sks + d[None, :], mask=cm & dm, other=0.0)
        v = tl.load(v_ptr + b * svb + kvh * svn + cols[:, None].to(tl.int64) * svs + d[None, :], mask=cm & dm, other=0.0)
        s_mask = _mask_scores(mrow, 0, cols[None, :].to(tl.int64), rm & (cols[None, :] < seq_k), smt, MASK)
        m_i, l_i, acc = _online_block(q, k.to(q.dtype), v.to(q.dtype), s_mask, m_i, l_i, acc, scale)
        start += BLOCK_N
    y = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + ((b * heads + n) * seq_q + rows[:, None]) * head_dim + d[None, :], y.to(q.dtype), mask=rm & dm)


def flash_attention(q, k, v, mask, scale: float, out=None) -> torch.Tensor:
    """q [B, N, S, D]; k, v [B, KV, T, D]; mask bool/additive broadcastable to [B, N, S, T] -> [B, N, S, D]
    (into out[0] where given)."""
    bsz, heads, seq_q, d = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    m, kind, sm = _mask_args(mask, (bsz, heads, seq_q, seq_k))
    out = output(out, 0, (bsz, heads, seq_q, d), q.dtype, q.device)
    block_d = next_pow2(d, 16)
    block_m = 64 if seq_q > 32 else 16
    block_n = 64 if block_d <= 64 else 32
    grid = (triton.cdiv(seq_q, block_m), bsz * heads)
    _flash_kernel[grid](q, k, v, m if m is not None else q, out, seq_q, seq_k, heads, heads // kv_heads, d, float(scale),
                        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2), *sm,
                        MASK=kind, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return out


@triton.jit
def _decode_kernel(q_ptr, kn_ptr, vn_ptr, cs_ptr, sn_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, ks_ptr, vs_ptr,
                   part_ptr, ml_ptr, count_ptr, y_ptr,
                   heads, kv_heads, group, head_dim, rot_dim, scale, chunk, splits,
                   sqb, sqn, sknb, sknn, svnb, svnn, scb, skb, skn, skt, smb, smn, smt,
                   MASK: tl.constexpr, QUANT: tl.constexpr, NEW: tl.constexpr, ROPE: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    inputs_ready(PDL)
    bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bk // kv_heads).to(tl.int64)
    kvh = (bk % kv_heads).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    n = kvh * group + g  # the query heads that read this kv head
    gm = g[:, None] < group
    d = tl.arange(0, BLOCK_D)
    dm = d[None, :] < head_dim
    pos = tl.load(pos_ptr).to(tl.int32)  # slots 0..pos are attended to; this step's is pos
    q = rotate_rows(q_ptr + b * sqb, tl.where(g < group, n, -1), d, sqn, 1, cs_ptr + b * scb, sn_ptr + b * scb,
                    rot_dim, head_dim, ROPE)
    kbase = b * skb + kvh * skn
    if NEW:  # this step's k/v: rotated here, stored by the split that owns slot pos, used from registers
        kn = rotate_rows(kn_ptr + b * sknb, tl.zeros([1], tl.int64) + kvh, d, sknn, 1, cs_ptr + b * scb,
                         sn_ptr + b * scb, rot_dim, head_dim, ROPE).to(k_ptr.dtype.element_ty)
        vn = tl.load(vn_ptr + b * svnb + kvh * svnn + d[None, :], mask=dm, other=0.0).to(v_ptr.dtype.element_ty)
        if pos // chunk == split:
            tl.store(k_ptr + kbase + pos.to(tl.int64) * skt + d[None, :], kn, mask=dm)
            tl.store(v_ptr + kbase + pos.to(tl.int64) * skt + d[None, :], vn, mask=dm)
    end = tl.minimum(split * chunk + chunk, pos + 1)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    mrow = mask_ptr + b * smb + n[:, None] * smn
    if QUANT:
        ks = tl.load(ks_ptr + kvh)
        vs = tl.load(vs_ptr + kvh)
    i = split * chunk
    while i < end:
        cols = i + tl.arange(0, BLOCK_N)
        cm = cols[:, None] < end
        off = kbase + cols[:, None].to(tl.int64) * skt + d[None, :]
        k = tl.load(k_ptr + off, mask=cm & dm, other=0.0)
        v = tl.load(v_ptr + off, mask=cm & dm, other=0.0)
        if NEW:
            k = tl.where(cols[:, None] == pos, kn, k)
            v = tl.where(cols[:, None] == pos, vn, v)
        if QUANT:
            k = k.to(tl.float32) * ks
            v = v.to(tl.float32) * vs
        s_mask = _mask_scores(mrow, 0, cols[None, :].to(tl.int64), gm & (cols[None, :] < end), smt, MASK)
        m_i, l_i, acc = _online_block(q, k.to(q.dtype), v.to(q.dtype), s_mask, m_i, l_i, acc, scale)
        i += BLOCK_N
    # partials [B, N, splits] (+ (max, sum)); the last split of this (batch, kv head) to count in
    # merges them in split order (the result does not depend on arrival order) and resets the count
    pm = g < group
    part = (b * heads + n) * splits + split
    tl.store(part_ptr + part[:, None] * head_dim + d[None, :], acc, mask=gm & dm)
    tl.store(ml_ptr + part * 2, m_i, mask=pm)
    tl.store(ml_ptr + part * 2 + 1, l_i, mask=pm)
    tl.debug_barrier()  # every thread's partial is stored before the count releases them
    if tl.atomic_add(count_ptr + bk, 1, sem="acq_rel") == splits - 1:
        tl.debug_barrier()
        top = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        y = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        base = (b * heads + n) * splits
        sp = 0
        while sp <= tl.minimum(pos // chunk, splits - 1):  # splits past slot pos attended to nothing
            m_s = tl.load(ml_ptr + (base + sp) * 2, mask=pm, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(ml_ptr + (base + sp) * 2 + 1, mask=pm, other=0.0, cache_modifier=".cg")
            a_s = tl.load(part_ptr + (base + sp)[:, None] * head_dim + d[None, :], mask=gm & dm, other=0.0,
                          cache_modifier=".cg")
            new_top = tl.maximum(top, m_s)
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            w_old = tl.where(top == float("-inf"), 0.0, tl.exp(top - safe))
            w_s = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - safe))
            total = total * w_old + l_s * w_s
            y = y * w_old[:, None] + a_s * w_s[:, None]
            top = new_top
            sp += 1
        y = y / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(y_ptr + (b * heads + n)[:, None] * head_dim + d[None, :], y.to(y_ptr.dtype.element_ty), mask=gm & dm)
        tl.atomic_xchg(count_ptr + bk, 0)


def decode_attention(q, kbuf, vbuf, mask, pos, scale: float, k_scale=None, v_scale=None, *, k=None, v=None,
                     cos=None, sin=None, rotary_dim: int = 0, out=None) -> torch.Tensor:
    """One decode step in one kernel: q [B, N, 1, D] against the static cache kbuf/vbuf [B, KV, T, D]
    (slots 0..pos; int8 or fp8 codes with k_scale/v_scale [KV]); mask broadcastable to [B, N, 1, T]
    -> y [B, N, 1, D] (into out[0] where given).
    k, v [B, KV, 1, D]: this step's key/value (codes for a quantized cache), stored at slot pos and
    attended to as stored; None: slot pos is already written.
    cos, sin [B or 1, 1, R]: rotate q and k first (plugins/rotary's math, R = rotary_dim or D);
    not with a quantized cache (its codes are made from the rotated k before this call)."""
    from ..triton_util import tile_counters

    bsz, heads, _, d = q.shape
    kv_heads, t = kbuf.shape[1], kbuf.shape[2]
    group = heads // kv_heads
    quant, new, rope = k_scale is not None, k is not None, cos is not None
    if rope and (quant or not new):
        raise ValueError("decode_attention: rotary needs this step's float k")
    if rope and not (cos.shape == sin.shape and cos.dim() == 3 and cos.shape[1] == 1):
        raise ValueError(f"decode_attention: tables must be [B or 1, 1, R], not {tuple(cos.shape)}")
    m, kind, sm = _mask_args(mask, (bsz, heads, 1, t))
    block_n = 32
    chunk = max(block_n, triton.cdiv(triton.cdiv(t, DECODE_SPLITS), block_n) * block_n)
    splits = triton.cdiv(t, chunk)
    part = torch.empty(bsz, heads, splits, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(bsz, heads, splits, 2, dtype=torch.float32, device=q.device)
    y = output(out, 0, (bsz, heads, 1, d), q.dtype, q.device)
    kn, vn = (k, v) if new else (q, q)
    cs, sn = (t.reshape(t.shape[0], -1).contiguous() for t in (cos, sin)) if rope else (q, q)
    _decode_kernel[(bsz * kv_heads, splits)](
        q, kn, vn, cs, sn, kbuf, vbuf, m if m is not None else q, pos, k_scale if quant else q,
        v_scale if quant else q, part, ml, tile_counters(q.device, bsz * kv_heads), y,
        heads, kv_heads, group, d, rotary_dim or d, float(scale), chunk, splits, q.stride(0), q.stride(1),
        kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        cs.stride(0) if rope and cs.shape[0] > 1 else 0,
        kbuf.stride(0), kbuf.stride(1), kbuf.stride(2), sm[0], sm[1], sm[3],
        MASK=kind, QUANT=quant, NEW=new, ROPE=rope, BLOCK_G=next_pow2(group, 16), BLOCK_N=block_n,
        BLOCK_D=next_pow2(d, 16), num_warps=4, **pdl(q.device, bsz * kv_heads * splits))
    return y
