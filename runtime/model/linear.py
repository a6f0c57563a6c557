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
from leank.kernels import cpu, dispatch, ggml_cpu
from leank.kernels.gguf_cuda import TYPES as CUDA_BLOCK_TYPES

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


class CudaQuantLinear(Linear):
    """A matrix kept in GGUF's quantized blocks on a CUDA device (`leank.kernels.tl_gemv`): up to
    `tilelang_ops.GEMV_ROWS` rows of activations are quantized to 8 bits per 32 and multiplied straight
    from the blocks (decoded in registers, integer dot products); more rows (a prompt, a large batch)
    multiply slices of the matrix decoded to the compute dtype (at most DECODE_CHUNK weights at a time)
    with cuBLAS.

    `parts`: [(blocks (rows, row bytes) uint8 on the CPU, GGML type id)] stacked along the output rows;
    consecutive parts of one type are uploaded into one device tensor (one launch for q, k and v)."""

    DECODE_CHUNK = 1 << 26  # weights decoded at a time for a many-row product: 128 MiB in bfloat16

    def __init__(self, parts: list[tuple[torch.Tensor, int]], in_features: int, bias: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype):
        from leank.kernels import tilelang_ops  # TileLang: imported on the CUDA path only

        self._tl = tilelang_ops
        self.k, self.dtype, self.bias = in_features, dtype, bias
        self.groups: list[tuple[torch.Tensor, str, int]] = []  # (device blocks, type name, first output column)
        col = 0
        i = 0
        while i < len(parts):
            t = parts[i][1]
            j = i
            while j < len(parts) and parts[j][1] == t and parts[j][0].shape[1] == parts[i][0].shape[1]:
                j += 1
            rows = sum(p.shape[0] for p, _ in parts[i:j])
            dev = torch.empty((rows, parts[i][0].shape[1]), dtype=torch.uint8, device=device)
            r = 0
            for p, _ in parts[i:j]:
                dev[r:r + p.shape[0]].copy_(p)
                r += p.shape[0]
            self.groups.append((dev, cpu.BLOCK_TYPES[t], col))
            col += rows
            i = j
        self._out = col
        self._chunks = []  # per group: (first row, device row numbers) of each slice a many-row product decodes
        for blocks, _, _ in self.groups:
            step = max(1, self.DECODE_CHUNK // in_features)
            self._chunks.append([(r, torch.arange(r, min(r + step, blocks.shape[0]), dtype=torch.int32, device=device))
                                 for r in range(0, blocks.shape[0], step)])

    @property
    def kernel(self) -> str:
        return "tilelang"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if x2.dtype != self.dtype or not x2.is_contiguous():
            x2 = x2.to(self.dtype).contiguous()
        if x2.data_ptr() % 16:  # the kernels read 8 activations at a time
            x2 = x2.clone()
        M = x2.shape[0]
        if M <= self._tl.GEMV_ROWS:
            return self.project(*self._tl.quantize_x(x2)).view(*lead, self._out)  # quantized once for every part
        pieces = [(col + r0, x2 @ self._tl.dequantize(blocks, t, ids, self.dtype).T)
                  for (blocks, t, col), chunks in zip(self.groups, self._chunks) for r0, ids in chunks]
        if len(pieces) == 1:
            y = pieces[0][1]
        else:
            y = torch.empty((M, self._out), dtype=self.dtype, device=x2.device)
            for c, part in pieces:
                y[:, c:c + part.shape[1]] = part
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self._out)

    def project(self, xq: torch.Tensor, xd: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias) (+ residual) for up to GEMV_ROWS rows of activations already quantized
        (`tilelang_ops.quantize_x`, or the fused `rmsnorm_qx` / `silu_mul_qx`): (M, out_features) in the
        compute dtype. The bias, or a residual (M, out_features), is added by the gemv kernel itself."""
        y = self._tl._empty((xq.shape[0], self._out), self.dtype, xq.device)
        add = residual if residual is not None else self.bias
        for blocks, t, col in self.groups:
            self._tl.gemv(blocks, t, xq, xd, y, col, add)
        if residual is not None and self.bias is not None:
            y += self.bias
        return y

    def rows(self, ids: torch.Tensor, checked: bool = True) -> torch.Tensor:
        """Rows `ids` of the matrix in the compute dtype (an embedding lookup): (*ids.shape, in_features).
        `checked`: ids out of range are an IndexError (read on the host: a sync; a CUDA-graph step, whose
        ids come from its own sampling or were checked when copied in, passes False)."""
        (blocks, t, _), = self.groups
        flat = ids.reshape(-1)
        if checked and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= blocks.shape[0]):
            raise IndexError(f"token id out of range [0, {blocks.shape[0]})")
        out = self._tl.dequantize(blocks, t, flat.to(device=blocks.device, dtype=torch.int32), self.dtype)
        return out.view(*ids.shape, self.k)

    @property
    def weight(self) -> torch.Tensor:
        """The matrix in the compute dtype (decoded: a copy)."""
        ws = [self._tl.dequantize(b, t, torch.arange(b.shape[0], dtype=torch.int32, device=b.device), self.dtype)
              for b, t, _ in self.groups]
        return ws[0] if len(ws) == 1 else torch.cat(ws)

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b, _, _ in self.groups) + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    @property
    def decoded_nbytes(self) -> int:
        """The largest slice a many-row product decodes at once, in bytes."""
        return max(c[0][1].numel() for c in self._chunks) * self.k * torch.finfo(self.dtype).bits // 8


def cuda_blocks_for(source_type: str) -> bool:
    """Whether matrices of GGUF type `source_type` stay in their blocks on a CUDA device: a type the
    TileLang kernels decode, TileLang installed, and LEANK_CUDA_BLOCKS not 0."""
    return (source_type in CUDA_BLOCK_TYPES and not cpu.switched_off("LEANK_CUDA_BLOCKS")
            and dispatch.tilelang_available())


def expansion_reason(types: list[str], dtype: torch.dtype) -> str:
    """Why matrices of quantized `types` are held in the compute dtype on CUDA (one line)."""
    name = str(dtype).removeprefix("torch.")
    if cpu.switched_off("LEANK_CUDA_BLOCKS"):
        return f"{', '.join(types)} matrices expanded to {name} on CUDA (LEANK_CUDA_BLOCKS=0)"
    if not dispatch.tilelang_available():
        return f"{', '.join(types)} matrices expanded to {name} on CUDA: TileLang is not installed"
    none = [t for t in types if t not in CUDA_BLOCK_TYPES]
    if none:
        return f"no CUDA block kernel for {', '.join(none)}: those matrices expanded to {name}"
    return f"{', '.join(types)} matrices stored beside unquantized ones expanded to {name} on CUDA"


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
    float32 and quantized blocks as they are when the C kernels handle them, else float16; on CUDA in
    float16/bfloat16, 'auto' keeps the blocks the TileLang kernels decode ('quantized'), anything else
    is 'dense' (the compute dtype)."""
    if requested not in WEIGHT_MODES:
        raise LeankError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {requested!r}")
    if device.type != "cpu" or dtype != torch.float32:
        cuda_blocks = (device.type == "cuda" and requested in ("auto", "quantized")
                       and dtype in (torch.float16, torch.bfloat16) and cuda_blocks_for(source_type))
        return "quantized" if cuda_blocks else "dense"
    if requested == "auto":
        if source_type == "F32":
            return "float32"
        requested = "quantized"
    if requested == "quantized":
        return "quantized" if quantized_kernels_for(source_type) else "float16"
    return requested


def weights_path(tensor_types: dict[str, int], device: torch.device) -> str:
    """How `leank.load(..., weights="auto")` stores and multiplies a file's matrices on `device`."""
    if device.type == "cuda":
        quant = [t for t in tensor_types if t not in ("F32", "F16", "BF16")]
        kept = [t for t in quant if cuda_blocks_for(t)]
        left = [t for t in quant if t not in kept]
        if not kept:
            why = "" if not quant else ("; TileLang not installed" if not dispatch.tilelang_available() else
                                        "; LEANK_CUDA_BLOCKS=0" if cpu.switched_off("LEANK_CUDA_BLOCKS") else "")
            return "cuda: dequantized to the compute dtype, torch matmul" + why
        step = ("decode steps fused (RMSNorm, SiLU and RoPE in 4 kernels beside the gemv; LEANK_CUDA_FUSED=0: "
                "unfused)" if not left and not cpu.switched_off("LEANK_CUDA_FUSED") else
                "decode steps op by op between the gemv kernels")
        graphs = ("CUDA graphs off (LEANK_CUDA_GRAPHS=0)" if cpu.switched_off("LEANK_CUDA_GRAPHS")
                  else "one CUDA-graph replay a step")
        return (f"cuda: {', '.join(kept)} kept in GGUF blocks (TileLang: decoded in registers for up to "
                f"8 rows, else slices decoded for cuBLAS)" + (f"; {', '.join(left)} dequantized" if left else "")
                + f"; {step}; {graphs}")
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
