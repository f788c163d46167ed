"""Triton kernels for mmc.Attention (the cuda target's face of plugins/attention).

    flash_attention   prefill and the vision tower: q [B, N, S, D] against k/v [B, KV, T, D],
                      tiles of BLOCK_M queries × BLOCK_N keys with an online softmax (flash-style),
                      any mask broadcastable to [B, N, S, T] (causal, padding, block-diagonal are
                      all just the mask), GQA by indexing kv head n // (N/KV)
    write_kv          decode: this step's k/v [B, KV, 1, D] stored at slot `pos` of the static
                      cache [B, KV, T_max, D], quantized per kv head for int8 / fp8 caches
    decode_attention  decode: split-KV over the static cache — grid (B·KV, splits); each program
                      takes the N/KV query heads of one kv head over one chunk of slots (stopping
                      at pos + 1: unwritten slots are never read) and writes a partial (max,
                      sum, weighted values); `_combine_kernel` merges the splits

Online softmax per row: m' = max(m, max s); p = exp(s - m'); l' = l·exp(m - m') + Σp;
acc' = acc·exp(m - m') + p·V; y = acc / l. A row with every score -inf ends with l = 0 and gives 0
(sdpa's NaN guard, `nan_to_zero`); a finite additive mask keeps the reference's semantics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmc.quantization import next_pow2

from ..triton_util import dot, output

NO_MASK, ADD_MASK, BOOL_MASK = 0, 1, 2
DECODE_SPLITS = 64   # target number of splits per (batch, kv head) over the static cache


def _mask_args(mask, shape4):
    """(mask or dummy, kind, strides over [B, N, S, T]) with broadcast axes at stride 0."""
    if mask is None:
        return None, NO_MASK, (0, 0, 0, 0)
    m = mask.expand(shape4)
    return m, BOOL_MASK if mask.dtype == torch.bool else ADD_MASK, tuple(m.stride())


@triton.jit
def _online_block(q, k, v, s_mask, m_i, l_i, acc, scale, P_FP32: tl.constexpr = False):
    """One key block of the online softmax; s_mask: scores with -inf where a key must not count.
    P_FP32: multiply the probabilities by V in float32 (decode: memory-bound, so exact is free)
    rather than rounded to V's dtype (prefill, as flash attention does)."""
    s = dot(q, tl.trans(k)) * scale + s_mask
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if P_FP32:
        acc = acc * alpha[:, None] + dot(p, v.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
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
def _write_kv_kernel(k_ptr, v_ptr, kbuf_ptr, vbuf_ptr, pos_ptr, kv_heads, head_dim,
                     skb, skn, svb, svn, sbb, sbn, sbt, BLOCK_D: tl.constexpr):
    bk = tl.program_id(0)
    b = (bk // kv_heads).to(tl.int64)
    h = (bk % kv_heads).to(tl.int64)
    pos = tl.load(pos_ptr).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < head_dim
    dst = b * sbb + h * sbn + pos * sbt + d
    tl.store(kbuf_ptr + dst, tl.load(k_ptr + b * skb + h * skn + d, mask=dm), mask=dm)
    tl.store(vbuf_ptr + dst, tl.load(v_ptr + b * svb + h * svn + d, mask=dm), mask=dm)


def write_kv(k, v, kbuf, vbuf, pos) -> None:
    """k, v [B, KV, 1, D] (already in the cache's dtype) -> kbuf/vbuf[:, :, pos] in one launch."""
    bsz, kv_heads, _, d = k.shape
    _write_kv_kernel[(bsz * kv_heads,)](k, v, kbuf, vbuf, pos, kv_heads, d, k.stride(0), k.stride(1),
                                         v.stride(0), v.stride(1), kbuf.stride(0), kbuf.stride(1), kbuf.stride(2),
                                         BLOCK_D=next_pow2(d, 1))


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, ks_ptr, vs_ptr, o_ptr, ml_ptr,
                   heads, kv_heads, group, head_dim, scale, chunk, splits,
                   sqb, sqn, skb, skn, skt, smb, smn, smt,
                   MASK: tl.constexpr, QUANT: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bk // kv_heads).to(tl.int64)
    kvh = (bk % kv_heads).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    n = kvh * group + g  # the query heads that read this kv head
    gm = g[:, None] < group
    d = tl.arange(0, BLOCK_D)
    dm = d[None, :] < head_dim
    q = tl.load(q_ptr + b * sqb + n[:, None] * sqn + d[None, :], mask=gm & dm, other=0.0)
    end = tl.minimum(split * chunk + chunk, tl.load(pos_ptr).to(tl.int32) + 1)  # slots 0..pos are written
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kbase = b * skb + kvh * skn
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
        if QUANT:
            k = k.to(tl.float32) * ks
            v = v.to(tl.float32) * vs
        s_mask = _mask_scores(mrow, 0, cols[None, :].to(tl.int64), gm & (cols[None, :] < end), smt, MASK)
        m_i, l_i, acc = _online_block(q, k.to(q.dtype), v.to(q.dtype), s_mask, m_i, l_i, acc, scale, True)
        i += BLOCK_N
    part = (b * heads + n) * splits + split  # [B, N, splits] partials
    pm = g < group
    tl.store(o_ptr + part[:, None] * head_dim + d[None, :], acc, mask=gm & dm)
    tl.store(ml_ptr + part * 2, m_i, mask=pm)
    tl.store(ml_ptr + part * 2 + 1, l_i, mask=pm)


@triton.jit
def _combine_kernel(o_ptr, ml_ptr, y_ptr, splits, head_dim, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * N + n
    sp = tl.arange(0, BLOCK_S)
    spm = sp < splits
    d = tl.arange(0, BLOCK_D)
    m = tl.load(ml_ptr + (row * splits + sp) * 2, mask=spm, other=float("-inf"))
    lsum = tl.load(ml_ptr + (row * splits + sp) * 2 + 1, mask=spm, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(top == float("-inf"), 0.0, top)))
    acc = tl.load(o_ptr + (row * splits + sp[:, None]) * head_dim + d[None, :],
                  mask=spm[:, None] & (d[None, :] < head_dim), other=0.0)
    total = tl.sum(w * lsum, 0)
    y = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(y_ptr + row * head_dim + d, y.to(y_ptr.dtype.element_ty), mask=d < head_dim)


def decode_attention(q, kbuf, vbuf, mask, pos, scale: float, k_scale=None, v_scale=None) -> torch.Tensor:
    """q [B, N, 1, D] against the static cache kbuf/vbuf [B, KV, T, D] (slots 0..pos written; int8 or
    fp8 codes with k_scale/v_scale [KV]); mask broadcastable to [B, N, 1, T] -> y [B, N, 1, D]."""
    bsz, heads, _, d = q.shape
    kv_heads, t = kbuf.shape[1], kbuf.shape[2]
    group = heads // kv_heads
    m, kind, sm = _mask_args(mask, (bsz, heads, 1, t))
    block_n = 32
    chunk = max(block_n, triton.cdiv(triton.cdiv(t, DECODE_SPLITS), block_n) * block_n)
    splits = triton.cdiv(t, chunk)
    part = torch.empty(bsz, heads, splits, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(bsz, heads, splits, 2, dtype=torch.float32, device=q.device)
    quant = k_scale is not None
    _decode_kernel[(bsz * kv_heads, splits)](
        q, kbuf, vbuf, m if m is not None else q, pos, k_scale if quant else q, v_scale if quant else q, part, ml,
        heads, kv_heads, group, d, float(scale), chunk, splits, q.stride(0), q.stride(1),
        kbuf.stride(0), kbuf.stride(1), kbuf.stride(2), sm[0], sm[1], sm[3],
        MASK=kind, QUANT=quant, BLOCK_G=next_pow2(group, 16), BLOCK_N=block_n, BLOCK_D=next_pow2(d, 16), num_warps=4)
    y = torch.empty(bsz, heads, 1, d, dtype=q.dtype, device=q.device)
    _combine_kernel[(bsz * heads,)](part, ml, y, splits, d, BLOCK_S=next_pow2(splits, 1), BLOCK_D=next_pow2(d, 1))
    return y
