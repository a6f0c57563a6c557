"""Rotary position embeddings as llama.cpp applies them, and the one place that knows channel orders.

Two conventions meet in a head's channels:
- llama-arch GGUFs store Q/K rows permuted so that channel pairs (2i, 2i+1) rotate together
  ("interleaved"); the Hugging Face checkpoint they came from pairs (i, i + d/2).
- qwen2/qwen3 GGUFs keep the Hugging Face order and rotate pairs (i, i + d/2) ("neox").
Pair i rotates at frequency base^(-2i/d): low i = high frequency.
"""
from __future__ import annotations

import math

import torch

from leank.errors import LeankError
from leank.runtime.arch import get as get_architecture
from leank.runtime.arch import names as architecture_names
from leank.runtime.arch.args import ModelArgs


def rope_mode(arch: str) -> str:
    """The channel order of `arch`'s Q/K heads in its GGUF files ("interleaved" or "neox")."""
    found = get_architecture(arch)
    if found is None:
        raise LeankError(f"architecture {arch!r} has no known channel order; supported: {', '.join(architecture_names())}")
    return found.rope_mode


def pair_index(arch: str, head_dim: int) -> torch.Tensor:
    """For each channel of a head in the model's GGUF order, the index i of its RoPE pair (0 = fastest)."""
    j = torch.arange(head_dim)
    return j // 2 if rope_mode(arch) == "interleaved" else j % (head_dim // 2)


def hf_to_gguf_permutation(arch: str, head_dim: int) -> torch.Tensor:
    """Index array P with gguf_channel[j] = hf_channel[P[j]] (identity for archs that keep HF order)."""
    if rope_mode(arch) != "interleaved":
        return torch.arange(head_dim)
    half = head_dim // 2
    j = torch.arange(head_dim)
    return (j % 2) * half + j // 2


def inverse_frequencies(args: ModelArgs, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair angular frequency (radians per position), float64, with `rope_freqs` factors applied."""
    d = args.rope_dims
    inv = args.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if rope_freqs is not None:
        inv = inv / rope_freqs.to(torch.float64)
    return inv


class Rope:
    """cos/sin tables for positions, computed on demand in float64 and cached per length."""

    def __init__(self, args: ModelArgs, rope_freqs: torch.Tensor | None, device, dtype=torch.float32):
        self.mode = args.rope_mode
        self.device, self.dtype = device, dtype
        s = args.rope_scaling
        inv = inverse_frequencies(args, rope_freqs)
        self.freq_scale = 1.0 / s.factor if s.kind in ("linear", "yarn") else 1.0
        self.inv_freq = inv
        self.mscale = 1.0
        self.ramp = None
        if s.kind == "yarn" and s.yarn_ext_factor != 0.0:
            # YaRN as ggml's rope_yarn: blend interpolated and extrapolated angles per pair
            d = args.rope_dims

            def corr_dim(n_rot: float) -> float:
                return d * math.log(s.original_context / (n_rot * 2 * math.pi)) / (2 * math.log(args.rope_base))

            low = max(0.0, math.floor(corr_dim(s.yarn_beta_fast)))
            high = min(d - 1.0, math.ceil(corr_dim(s.yarn_beta_slow)))
            i = torch.arange(d // 2, dtype=torch.float64)
            y = (i - low) / max(0.001, high - low)
            self.ramp = (1 - y.clamp(0, 1)) * s.yarn_ext_factor
            self.mscale = s.yarn_attn_factor * (1.0 + 0.1 * math.log(1.0 / self.freq_scale))
        elif s.kind == "yarn":
            self.mscale = s.yarn_attn_factor
        self._cos = self._sin = None
        self._extend(4096)

    def _extend(self, n: int) -> None:
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        extrap = pos * self.inv_freq[None, :]
        theta = extrap * self.freq_scale
        if self.ramp is not None:
            theta = theta * (1 - self.ramp) + extrap * self.ramp
        cos, sin = torch.cos(theta) * self.mscale, torch.sin(theta) * self.mscale
        self._cos = cos.to(self.device, self.dtype)
        self._sin = sin.to(self.device, self.dtype)
        # float32 interleaved pairs rotate fastest as one complex multiply
        self._cis = torch.complex(cos.float(), sin.float()).to(self.device) if self.dtype == torch.float32 else None

    def tables(self, start: int, length: int) -> "RopeTables":
        """The rotation for positions start .. start+length-1, shaped to broadcast over (B, T, H, D)."""
        end = start + length
        if end > self._cos.shape[0]:
            self._extend(max(end, 2 * self._cos.shape[0]))
        cis = None if self._cis is None else self._cis[start:end, None, :]
        return RopeTables(self._cos[start:end, None, :], self._sin[start:end, None, :], cis, self.mode)

    def reserve(self, n: int) -> None:
        """Tables for positions 0 .. n-1 from now on (a captured step indexes them on the device)."""
        if n > self._cos.shape[0]:
            self._extend(max(n, 2 * self._cos.shape[0]))

    def full_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (positions, d/2) for every position reserved so far (a kernel indexes them itself)."""
        return self._cos, self._sin

    def data_ptr(self) -> int:
        """Where the tables are now (they move when they grow: a captured step must follow them)."""
        return self._cos.data_ptr()

    def at(self, positions) -> torch.Tensor:
        """One position per row as a (B,) int64 tensor on the tables' device, the tables reserved past each.
        `positions`: a list of ints, or such a tensor already (read there, never on the host: its caller
        has `reserve`d the tables past every position), which passes as it is."""
        if torch.is_tensor(positions):
            return positions
        self.reserve(max(positions) + 1)
        return torch.tensor(positions, dtype=torch.long, device=self._cos.device)

    def tables_at(self, positions) -> "RopeTables":
        """The rotation for one token per row at its own position (B,) (`at`), shaped to broadcast over
        (B, 1, H, D)."""
        idx = self.at(positions)
        cis = None if self._cis is None else self._cis[idx][:, None, None, :]
        return RopeTables(self._cos[idx][:, None, None, :], self._sin[idx][:, None, None, :], cis, self.mode)


class RopeTables:
    """cos/sin (T, 1, d/2) (and complex cis for float32) for one forward pass."""

    __slots__ = ("cos", "sin", "cis", "mode")

    def __init__(self, cos, sin, cis, mode):
        self.cos, self.sin, self.cis, self.mode = cos, sin, cis, mode

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, T, H, d)."""
        if self.mode == "interleaved" and self.cis is not None and x.dtype == torch.float32:
            xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
            return torch.view_as_real(xc * self.cis).flatten(-2)
        # half precision: rotate in float32 (as llama.cpp does), store in the compute dtype
        return apply_rope(x.float(), self.cos, self.sin, self.mode).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str) -> torch.Tensor:
    """Rotate x (..., d) by angles whose cos/sin (..., d/2) broadcast against it."""
    if mode == "interleaved":
        xr = x.unflatten(-1, (-1, 2))
        x0, x1 = xr[..., 0], xr[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
