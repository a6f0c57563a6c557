"""KIVI quantization in torch: the reference the GPU kernels are tested against, and the CPU path.

Asymmetric quantization with a stored minimum (not an integer zero point), as KIVI:
    code = round((x - min) / scale), scale = (max - min) / (2^bits - 1), x ~= code * scale + min
K is quantized per channel over groups of `group` tokens; V per token over groups of `group` channels.
Scale and min are float16. They are rounded outward (min down, scale up) so that every value stays
inside the representable range and the error is at most half a step, after float16 rounding too.
Codes are bit-packed along the channel axis: byte j of a row holds channels j*per .. j*per+per-1,
channel j*per+i in bits [i*bits, (i+1)*bits) (little-endian within the byte), per = 8 // bits.
"""
from __future__ import annotations

import torch

# The bit widths a cache may use, K and V alike: 2, 4 and 8 are bit-packed codes, 16 means "not
# quantized" (kept in the compute dtype). The one list: policies, the schema, the CLI and the C and
# TileLang kernels check against it (tests/test_structure.py holds the C side to it).
BITS = (2, 4, 8, 16)
PACKABLE_BITS = tuple(b for b in BITS if b < 16)


def codes_per_byte(bits: int) -> int:
    return 8 // bits


def packed_width(n_channels: int, bits: int) -> int:
    """Bytes per row for `n_channels` codes (rows are zero-padded to whole bytes)."""
    per = codes_per_byte(bits)
    return (n_channels + per - 1) // per


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n) < 2^bits -> packed uint8 (..., packed_width(n, bits))."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = codes_per_byte(bits)
    n = codes.shape[-1]
    pad = (-n) % per
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.unflatten(-1, (-1, per))
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """packed uint8 (..., w) -> codes (..., n) as `dtype`, written straight into the output: code i of every
    byte is one contiguous shift-and-mask of the packed bytes stored into a strided slice of the result (on
    an AVX2 CPU about 4x faster than a broadcast shift followed by a conversion)."""
    if bits == 8:
        return packed[..., :n].to(dtype)
    per = codes_per_byte(bits)
    out = torch.empty(*packed.shape, per, dtype=dtype, device=packed.device)
    for i in range(per):
        out[..., i] = (packed >> (i * bits)) & ((1 << bits) - 1)
    return out.flatten(-2)[..., :n]


def _fp16_toward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The float16 value next to `x` (float16) toward +inf (up) or -inf."""
    bits = x.view(torch.int16).to(torch.int32)
    positive = bits >= 0  # sign bit clear (+0 included)
    if up:
        nxt = torch.where(positive, bits + 1, bits - 1)
        nxt = torch.where(bits == -32768, torch.ones_like(bits), nxt)  # -0 -> smallest positive
    else:
        nxt = torch.where(positive, bits - 1, bits + 1)
        nxt = torch.where(bits == 0, torch.full_like(bits, -32767), nxt)  # +0 -> smallest negative
    return nxt.to(torch.int16).view(torch.float16)


def quant_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (scale, min) covering [lo, hi] (float32) with 2^bits levels, rounded outward."""
    levels = (1 << bits) - 1
    mn = lo.to(torch.float16)
    mn = torch.where(mn.float() > lo, _fp16_toward(mn, up=False), mn)
    span = (hi - mn.float()).clamp_min(0)
    scale = (span / levels).to(torch.float16)
    scale = torch.where(scale.float() * levels < span, _fp16_toward(scale, up=True), scale)
    return scale, mn


def _quantize(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    levels = (1 << bits) - 1
    s = scale.float()
    q = torch.round((x.float() - mn.float()) / torch.where(s > 0, s, torch.ones_like(s)))
    return q.clamp_(0, levels).to(torch.uint8)


def quantize_k(k: torch.Tensor, bits: int, group: int):
    """K (..., T, C), T a multiple of `group` -> (packed codes (..., T, w), scale and min (..., T/group, C)).

    Per channel, over groups of `group` consecutive tokens.
    """
    *lead, T, C = k.shape
    g = k.float().reshape(*lead, T // group, group, C)
    scale, mn = quant_params(g.amin(-2), g.amax(-2), bits)
    codes = _quantize(g, scale.unsqueeze(-2), mn.unsqueeze(-2), bits).reshape(*lead, T, C)
    return pack(codes, bits), scale, mn


def dequantize_k(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int, n_channels: int,
                 dtype=torch.float32) -> torch.Tensor:
    """Inverse of `quantize_k`: (..., T, C) in `dtype`."""
    codes = unpack(packed, bits, n_channels, dtype)
    *lead, T, C = codes.shape
    g = codes.reshape(*lead, T // group, group, C)
    return torch.addcmul(mn.to(dtype).unsqueeze(-2), g, scale.to(dtype).unsqueeze(-2)).reshape(*lead, T, C)


def quantize_v(v: torch.Tensor, bits: int, group: int):
    """V (..., T, D), D a multiple of `group` -> (packed codes (..., T, w), scale and min (..., T, D/group)).

    Per token, over groups of `group` consecutive channels.
    """
    *lead, T, D = v.shape
    g = v.float().reshape(*lead, T, D // group, group)
    scale, mn = quant_params(g.amin(-1), g.amax(-1), bits)
    codes = _quantize(g, scale.unsqueeze(-1), mn.unsqueeze(-1), bits).reshape(*lead, T, D)
    return pack(codes, bits), scale, mn


def dequantize_v(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int, n_channels: int,
                 dtype=torch.float32) -> torch.Tensor:
    """Inverse of `quantize_v`: (..., T, D) in `dtype`."""
    codes = unpack(packed, bits, n_channels, dtype)
    *lead, T, D = codes.shape
    g = codes.reshape(*lead, T, D // group, group)
    return torch.addcmul(mn.to(dtype).unsqueeze(-1), g, scale.to(dtype).unsqueeze(-1)).reshape(*lead, T, D)


def hadamard(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of 2), symmetric: H @ H = I.

    Rotating vectors by it before quantizing spreads an outlier over every coordinate (what llama.cpp
    does before q4_0/q8_0 KV); dot products are unchanged, since H is orthonormal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-2 order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / h.shape[0] ** 0.5).to(dtype=dtype, device=device)
