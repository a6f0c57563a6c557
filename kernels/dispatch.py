"""Which implementation runs the cache's hot operations: TileLang kernels on CUDA when TileLang is
installed, C kernels on a CPU when they compile (`leank.kernels.cpu`), the torch reference otherwise.
TileLang is imported only here, only for a CUDA device."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from leank.kernels import cpu, quant, reference

_REFERENCE = SimpleNamespace(
    name="torch",
    quantize_k=quant.quantize_k,
    quantize_v=quant.quantize_v,
    compressed_attention=reference.compressed_attention,
)
_cache: dict = {}


def tilelang_available() -> bool:
    if os.environ.get("LEANK_NO_TILELANG"):
        return False
    try:
        import tilelang  # noqa: F401
    except Exception:
        return False
    return True


def ops_for(device: torch.device):
    """The operations for `device`: a namespace with quantize_k, quantize_v, compressed_attention, name."""
    device = torch.device(device)
    if device.type == "cpu":
        if "cpu" not in _cache:
            # compact_layer: the C ops only; the cache moves a layer's tokens into the middle with it
            _cache["cpu"] = _REFERENCE if cpu.library() is None else SimpleNamespace(
                **{**vars(_REFERENCE), "name": "C", "compressed_attention": cpu.compressed_attention,
                   "quantize_k": cpu.quantize_k, "quantize_v": cpu.quantize_v,
                   "compact_layer": cpu.compact_layer})
        return _cache["cpu"]
    if device.type != "cuda" or not tilelang_available():
        return _REFERENCE
    if "cuda" not in _cache:
        from leank.kernels import tilelang_ops

        _cache["cuda"] = tilelang_ops.ops()
    return _cache["cuda"]


def active_path(device) -> str:
    """A short description of the attention path for `device` (for `leank info`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "TileLang kernels (CUDA)" if tilelang_available() else "torch reference on CUDA (TileLang not installed)"

    if cpu.library() is not None:
        return "C kernels (CPU, compiled on first use)"
    return f"torch reference (CPU; C kernels unavailable: {cpu.unavailable_reason()})"
