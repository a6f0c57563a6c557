"""Weight matrices and how they are multiplied.

Decoding is bound by reading the weights. On a CPU, a float32 copy of a quantized GGUF doubles what
float16 would read, and torch has no fast kernels for GGUF's own block formats on AVX2. So on CPU the
matrices of a quantized (or half-precision) file are stored in float16 and multiplied with FBGEMM's
fp16 kernel, which computes in float32 (activations stay float32; only the weights are rounded to fp16).
A float32 file keeps float32 weights, so leank reproduces llama.cpp's float32 arithmetic exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_MODES = ("auto", "float32", "float16")


def fp16_kernels_available() -> bool:
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_prepack_fp16")
    except Exception:  # pragma: no cover - exotic builds
        return False


class Linear:
    """y = x @ W^T (+ b) for a dense weight in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dense(self) -> torch.Tensor:
        return self.weight

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class Fp16Linear(Linear):
    """float16 weight, float32 activations and accumulation (FBGEMM, CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self._out = weight.shape[0]
        self._numel = weight.numel()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(),
                                                              None if bias is None else bias.float())
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as float32 (unpacked: a copy, for calibration and training)."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    @property
    def out_features(self) -> int:
        return self._out

    def dense(self) -> torch.Tensor:
        return self.weight

    @property
    def nbytes(self) -> int:
        return self._numel * 2 + (0 if self.bias is None else self.bias.numel() * 4)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> Linear:
    """A `Linear` for `weight` (already in the compute dtype and device) stored as `mode` says:
    'float16' packs it for FBGEMM (CPU float32 compute only), anything else keeps it as it is."""
    if mode == "float16" and weight.device.type == "cpu" and weight.dtype == torch.float32 and fp16_kernels_available():
        return Fp16Linear(weight, bias)
    return Linear(weight, bias)


def storage_mode(requested: str, source_type: str, device: torch.device, dtype: torch.dtype) -> str:
    """How to store a matrix whose GGUF type is `source_type` ('auto' -> float16 on CPU unless F32)."""
    if requested not in WEIGHT_MODES:
        from leank.errors import LeankError

        raise LeankError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {requested!r}")
    if device.type != "cpu" or dtype != torch.float32:
        return "dense"
    if requested == "auto":
        return "float32" if source_type == "F32" else "float16"
    return requested
