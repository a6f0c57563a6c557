"""Weight matrices and how they are multiplied.

Decoding is bound by reading the weights. On a CPU leank keeps a quantized GGUF's matrices in the
file's own blocks (the memory-mapped file itself: no copy) and multiplies them straight from those
blocks, reading their 4.5-8.5 bits a weight instead of float16's 16: with ggml's own matrix multiply
where llama-cpp-python installed it (`leank.kernels.ggml_cpu`: activations quantized to 8 bits, as
llama.cpp does; a prompt goes through ggml's tiled kernels too), else with leank's C kernels
(`leank.kernels.cpu`, compiled on first use: float32 activations times weights decoded exactly as ggml
decodes them). Types neither knows (and machines without a C compiler) store matrices in float16 and
use FBGEMM's fp16 kernel, which computes in float32. A float32 file keeps float32 weights, so leank
reproduces llama.cpp's float32 arithmetic exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leank.errors import LeankError
from leank.kernels import cpu, ggml_cpu

WEIGHT_MODES = ("auto", "float32", "float16", "quantized")

# Without ggml: up to this many rows of activations, quantized matrices multiply in C straight from
# their blocks; more rows (a prompt) amortize decoding the matrix to float32 once for a BLAS matmul.
QUANT_DIRECT_ROWS = 8


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

    @property
    def nbytes(self) -> int:
        return self._numel * 2 + (0 if self.bias is None else self.bias.numel() * 4)


class QuantLinear(Linear):
    """A matrix kept in GGUF's quantized blocks (CPU, float32 activations); see the module docstring.

    `parts`: [(blocks (rows, row bytes) uint8, GGML type id)], stacked along the output rows (q, k and
    v of different types stay separate parts)."""

    def __init__(self, parts: list[tuple[torch.Tensor, int]], in_features: int, bias: torch.Tensor | None = None):
        self.k = in_features
        self.bias = None if bias is None else bias.float().contiguous()
        # ggml's multiply where llama-cpp-python's install has it (`leank.kernels.ggml_cpu`); it keeps the
        # parts it was given (the same bytes, or aligned copies) so that its tensors stay valid
        self._ggml = ggml_cpu.matrix(parts, in_features)
        self.parts = self._ggml.parts if self._ggml is not None else parts
        self._out = sum(b.shape[0] for b, _ in self.parts)
        # else cpu_matmul.c, per part: its leading arguments and the part's first output column
        self._qmatmul = None if self._ggml is not None else cpu.library().leank_qmatmul
        self._calls, col = [], 0
        if self._ggml is None:
            for b, t in self.parts:
                self._calls.append(((t, b.data_ptr(), b.shape[1], b.shape[0], in_features), col))
                col += b.shape[0]

    @property
    def kernel(self) -> str:
        """'ggml' or 'leank' (cpu_matmul.c), for tests and `leank info`."""
        return "ggml" if self._ggml is not None else "leank"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        T = x2.shape[0]
        if self._ggml is not None:
            y = self._ggml.matmul(x2, torch.get_num_threads())
            if self.bias is not None:
                y += self.bias
            return y.view(*lead, self._out)
        if T > QUANT_DIRECT_ROWS:
            return F.linear(x2, self.weight, self.bias).view(*lead, self._out)
        y = torch.empty(T, self._out)
        yp, xp, n_out, threads = y.data_ptr(), x2.data_ptr(), self._out, torch.get_num_threads()
        bp = None if self.bias is None else self.bias.data_ptr()
        for fixed, col in self._calls:
            if self._qmatmul(*fixed, xp, T, yp + 4 * col, n_out, None if bp is None else bp + 4 * col, threads):
                raise RuntimeError("leank_qmatmul rejected its arguments")
        return y.view(*lead, self._out)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the matrix as float32 (an embedding lookup): (*ids.shape, in_features)."""
        (b, t), = self.parts
        return cpu.dequantize_rows(b, t, self.k, ids)

    @property
    def weight(self) -> torch.Tensor:
        """The matrix as float32 (decoded: a copy)."""
        ws = [cpu.dequantize(b, t, self.k) for b, t in self.parts]
        return ws[0] if len(ws) == 1 else torch.cat(ws)

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b, _ in self.parts) + (0 if self.bias is None else self.bias.numel() * 4)


def quantized_kernels_for(source_type: str) -> bool:
    """Whether matrices of GGUF type `source_type` can stay in their blocks on this machine."""
    return source_type in cpu.BLOCK_TYPES.values() and cpu.library() is not None


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> Linear:
    """A `Linear` for `weight` (already in the compute dtype and device) stored as `mode` says:
    'float16' packs it for FBGEMM (CPU float32 compute only), anything else keeps it as it is."""
    if mode == "float16" and weight.device.type == "cpu" and weight.dtype == torch.float32 and fp16_kernels_available():
        return Fp16Linear(weight, bias)
    return Linear(weight, bias)


def storage_mode(requested: str, source_type: str, device: torch.device, dtype: torch.dtype) -> str:
    """How to store a matrix whose GGUF type is `source_type`: on a float32 CPU, 'auto' keeps F32 as
    float32 and quantized blocks as they are when the C kernels handle them, else float16."""
    if requested not in WEIGHT_MODES:
        raise LeankError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {requested!r}")
    if device.type != "cpu" or dtype != torch.float32:
        return "dense"
    if requested == "auto":
        if source_type == "F32":
            return "float32"
        requested = "quantized"
    if requested == "quantized":
        return "quantized" if quantized_kernels_for(source_type) else "float16"
    return requested


def weights_path(tensor_types: dict[str, int], device: torch.device) -> str:
    """How `leank.load(..., weights="auto")` stores and multiplies a file's matrices on `device`."""
    if device.type != "cpu":
        return f"{device.type}: dequantized to the compute dtype, torch matmul"
    quant = {t: n for t, n in tensor_types.items() if t not in ("F32", "F16", "BF16")}
    if not quant:
        return "float32 / float16 copies (torch, FBGEMM)"
    kept = [t for t in quant if quantized_kernels_for(t)]
    if len(kept) == len(quant):
        return f"kept in GGUF blocks ({', '.join(kept)}), multiplied by {ggml_cpu.matmul_path()}"
    if kept:
        return (f"{', '.join(kept)} kept in GGUF blocks ({ggml_cpu.matmul_path()}); "
                f"{', '.join(t for t in quant if t not in kept)} as float16 (FBGEMM)")
    why = cpu.unavailable_reason()
    return "float16 copies (FBGEMM)" + (f"; C kernels unavailable: {why}" if why else "")
