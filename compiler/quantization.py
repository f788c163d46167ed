"""Quantization helpers: symmetric per-output-channel and group-wise (block) integer
quantization of a [K, N] GEMM weight, FP8 (e4m3fn) weights, per-tensor activation
quantization, dequantization, the packing ONNX Runtime's MatMulNBits reads, and the error
measures the accuracy report uses.

    per-channel (bits b, axis = output column n):  s[n]    = max_k |W[k, n]| / (2^(b-1) - 1)
    group-wise  (group g along K):                 s[j, n] = max_{k in block j} |W[k, n]| / (2^(b-1) - 1)
    q = clip(round(W / s), -2^(b-1), 2^(b-1) - 1);   Ŵ = q * s
    fp8 e4m3fn per channel:                        s[n] = max_k |W[k, n]| / 448;  q = fp8(W / s)
    activations, per tensor (static, calibrated):  s = amax / 127 (int8) or amax / 448 (fp8);
                                                   q = clip(round(x / s)) or fp8(clip(x / s, ±448))
    KV cache, per kv head h (axis 1 of [B, KV, T, D]): s[h] = amax[h] / 127 or / 448, same q

All-zero columns/blocks get scale 1 (q = 0, Ŵ = 0 exactly). Rounding is half to even, as in
ONNX's QuantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP8_MAX = 448.0  # largest finite float8 e4m3fn
MODES = ("int8", "int4", "w8a8", "fp8", "float")  # "float": weights untouched (a KV-cache-only config)
KV_CACHE = ("int8", "fp8")


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "int8"                # "int8" (W8A16 per output channel) | "int4" (W4A16 group-wise)
                                      # | "float" (weights stay float; only the KV cache is quantized)
                                      # | "w8a8" (int8 weights per channel, int8 activations per tensor)
                                      # | "fp8" (e4m3fn weights per channel, e4m3fn activations per tensor)
    group_size: int = 128             # int4 only
    keep_float: tuple = ("lm_head",)  # layers left in float: "lm_head" (the logits GEMM) and names
    smooth_alpha: float | None = None  # w8a8: SmoothQuant migration strength (None: no smoothing)
    kv_cache: str | None = None       # "int8" | "fp8": the decoder's K/V cache per kv head (None: float)

    @property
    def bits(self) -> int:
        return 4 if self.mode == "int4" else 8

    @property
    def weight_type(self) -> str:
        return {"int4": "int4", "fp8": "fp8e4m3", "float": "float"}.get(self.mode, "int8")

    @property
    def activations(self) -> str | None:
        return {"w8a8": "int8", "fp8": "fp8e4m3"}.get(self.mode)

    @property
    def needs_calibration(self) -> bool:
        """Activation or KV-cache scales come from calibration; weight-only modes need none."""
        return self.activations is not None or self.kv_cache is not None

    def describe(self) -> dict:
        out = {"mode": self.mode, "weights": self.weight_type, "activations": self.activations or "float",
               "granularity": f"group-{self.group_size}" if self.mode == "int4" else "per-output-channel",
               "symmetric": True, "keep_float": list(self.keep_float), "kv_cache": self.kv_cache or "float"}
        if self.mode == "float":
            out["granularity"] = None
        if self.kv_cache:
            out["kv_cache_granularity"] = "per kv head, static (calibrated)"
        if self.activations:
            out["activation_granularity"] = "per-tensor, static (calibrated)"
        if self.mode == "w8a8":
            out["smoothquant_alpha"] = self.smooth_alpha
        return out


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _safe(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, 1.0)


def quantize_per_channel(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (q [K, N] int8 holding b-bit values, scale [N] float32)."""
    lo, hi = qrange(bits)
    w64 = w.astype(np.float64)
    scale = _safe(np.abs(w64).max(axis=0) / hi)
    q = np.clip(np.rint(w64 / scale), lo, hi).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_blockwise(w: np.ndarray, bits: int = 4, group: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (q [K, N] int8 holding b-bit values, scale [ceil(K/g), N] float32);
    the last block may be short (K not a multiple of g)."""
    lo, hi = qrange(bits)
    k = w.shape[0]
    blocks = -(-k // group)
    padded = np.zeros((blocks * group, w.shape[1]), dtype=np.float64)
    padded[:k] = w
    b = padded.reshape(blocks, group, -1)
    scale = _safe(np.abs(b).max(axis=1) / hi)                           # [blocks, N]
    q = np.clip(np.rint(b / scale[:, None, :]), lo, hi).astype(np.int8)
    return q.reshape(blocks * group, -1)[:k], scale.astype(np.float32)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (q [K, N] float8_e4m3fn, scale [N] float32), per output channel."""
    import ml_dtypes

    w64 = w.astype(np.float64)
    scale = _safe(np.abs(w64).max(axis=0) / FP8_MAX).astype(np.float32)
    q = np.clip(w64 / scale, -FP8_MAX, FP8_MAX).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def activation_scale(amax: float, kind: str) -> float:
    """Per-tensor scale for an activation of absolute range `amax` ("int8" or "fp8e4m3")."""
    top = 127.0 if kind == "int8" else FP8_MAX
    return float(np.float32(amax / top)) if amax > 0 else 1.0


def fake_quantize(x: np.ndarray, scale: float, kind: str) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear of x with a per-tensor scale (zero point 0), float64 math."""
    import ml_dtypes

    y = x.astype(np.float64) / np.float32(scale)
    if kind == "int8":
        q = np.clip(np.rint(y), -128, 127)
    else:
        q = np.clip(y, -FP8_MAX, FP8_MAX).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (q * np.float32(scale)).astype(np.float32)


def kv_dtype(kind: str) -> np.dtype:
    """The numpy dtype of a quantized KV cache ("int8" or "fp8": ml_dtypes' float8_e4m3fn)."""
    import ml_dtypes

    return np.dtype(np.int8) if kind == "int8" else np.dtype(ml_dtypes.float8_e4m3fn)


def kv_scale(amax: np.ndarray, kind: str) -> np.ndarray:
    """Per-head scales [KV] float32 from per-head absolute ranges (0 -> 1, like the weights)."""
    top = 127.0 if kind == "int8" else FP8_MAX
    return _safe(np.asarray(amax, np.float64) / top).astype(np.float32)


def quantize_per_head(x: np.ndarray, scale: np.ndarray, kind: str) -> np.ndarray:
    """x [B, KV, T, D] -> codes in kv_dtype(kind), one scale per head (axis 1); QuantizeLinear's
    math: x / s in float32, then round half to even and saturate (int8) or saturate and round
    to nearest fp8 (e4m3fn)."""
    y = x.astype(np.float32) / scale.astype(np.float32).reshape(1, -1, 1, 1)
    if kind == "int8":
        return np.clip(np.rint(y), -128, 127).astype(np.int8)
    return np.clip(y, -FP8_MAX, FP8_MAX).astype(kv_dtype(kind))


def dequantize_per_head(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Codes [B, KV, T, D] -> float32 (q * s[head])."""
    return (q.astype(np.float32) * scale.astype(np.float32).reshape(1, -1, 1, 1)).astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, group: int | None = None) -> np.ndarray:
    """Ŵ [K, N] float32 from per-channel (scale [N]) or group-wise (scale [blocks, N]) codes."""
    if scale.ndim == 1:
        return (q.astype(np.float32).astype(np.float64) * scale).astype(np.float32)
    s = np.repeat(scale.astype(np.float64), group, axis=0)[: q.shape[0]]
    return (q.astype(np.float64) * s).astype(np.float32)


def pack_matmulnbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed codes q [K, N] -> MatMulNBits' B: uint8 [N, ceil(K/block), block*bits/8], codes
    offset by 2^(bits-1) (its default zero point), low nibble first for 4 bits; a short last
    block is padded with the zero point (adds 0)."""
    k, n = q.shape
    blocks = -(-k // block)
    zp = 2 ** (bits - 1)
    codes = np.full((blocks * block, n), zp, dtype=np.uint8)
    codes[:k] = (q.astype(np.int16) + zp).astype(np.uint8)
    codes = codes.reshape(blocks, block, n).transpose(2, 0, 1)             # [N, blocks, block]
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(codes.astype(np.uint8))


def weight_error(w: np.ndarray, w_hat: np.ndarray) -> dict:
    """Relative Frobenius error and SNR (dB) of a reconstructed weight."""
    w64, err = w.astype(np.float64), w.astype(np.float64) - w_hat.astype(np.float64)
    signal, noise = float((w64 ** 2).sum()), float((err ** 2).sum())
    return {"rel_error": float(np.sqrt(noise / signal)) if signal else 0.0,
            "snr_db": float(10 * np.log10(signal / noise)) if noise else float("inf")}


def next_pow2(n: int, least: int = 16) -> int:
    p = least
    while p < n:
        p *= 2
    return p



def weight_dq(node):
    """The DequantizeLinear of a constant feeding a plain MatMul's weight (quantize-weights'
    form), or None."""
    import onnx_graphsurgeon as gs

    if node.op != "MatMul" or node.domain or len(node.inputs) != 2 or len(node.inputs[1].inputs) != 1:
        return None
    dq = node.inputs[1].inputs[0]
    return dq if dq.op == "DequantizeLinear" and isinstance(dq.inputs[0], gs.Constant) else None
