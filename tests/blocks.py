"""Random GGUF blocks for kernel tests: every byte random, the float16 scale fields set to sane
positive values (so that no block decodes to inf or NaN), with gguf-py's float32 decoding beside them."""
import numpy as np
import torch

TYPE_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
# where each type's blocks keep their float16 fields (scales, minimums)
HALVES = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
          "Q6_K": [208]}


def random_blocks(type_name: str, rows: int, k: int, seed: int, signed: bool = False):
    """(blocks (rows, row bytes) uint8, GGML type id, gguf-py's float32 decoding (rows, k)): every byte
    random, the float16 fields set to sane positive values (of either sign if `signed`)."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    qt = Q[type_name]
    bs, tb = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // bs * tb), dtype=np.uint8)
    blk = raw.reshape(rows, k // bs, tb)
    for off in HALVES[type_name]:
        h = rng.random((rows, k // bs)) * 0.02 + 0.001
        if signed:
            h *= rng.choice([-1.0, 1.0], size=h.shape)
        h = h.astype(np.float16)
        blk[:, :, off : off + 2] = h.view(np.uint8).reshape(rows, k // bs, 2)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qt).reshape(rows, k))
    return torch.from_numpy(raw.copy()), int(qt), w


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit activations the gemv kernel multiplies: per group of 32, scale amax / 127 and codes
    rint(x / scale) (x times the scale's float32 reciprocal), in float32 as the kernel computes them."""
    g = x.float().reshape(x.shape[0], -1, 32)
    d = g.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(g * inv[..., None]).to(torch.int8).reshape(x.shape), d


def gemv_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(m, N) bounds on |x @ W^T - the product with x quantized to 8 bits|: each activation moves by at
    most half its group's scale."""
    _, d = quantized_activations(x)
    half_step = (d / 2).repeat_interleave(32, dim=1).double()  # (m, K)
    return half_step @ w.double().abs().T


# --- the fused decode-step kernels' references (`gguf_cuda.STEP`): torch's unfused ops -------------------
def rmsnorm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the transformer computes it unfused: in float32, rounded to x's dtype."""
    return torch.nn.functional.rms_norm(x.float(), w.shape, w.float(), eps).to(x.dtype)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up in gate_up's dtype, as the unfused feed-forward computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate).mul_(up)


def rope_reference(qkv, pos, cos, sin, n_heads, n_kv_heads, head_dim, neox):
    """The rotated q (M, Hq, D) and k (M, Hkv, D) heads of qkv's rows, as `Rope.apply` rotates them."""
    from leank.runtime.model.rope import apply_rope

    M = qkv.shape[0]
    x = qkv[:, : (n_heads + n_kv_heads) * head_dim].reshape(M, n_heads + n_kv_heads, head_dim)
    out = apply_rope(x.float(), cos[pos][:, None], sin[pos][:, None], "neox" if neox else "interleaved").to(qkv.dtype)
    return out[:, :n_heads], out[:, n_heads:]


def assert_same_quantized(xq, xd, ref: torch.Tensor) -> None:
    """8-bit activations (xq, xd) of a fused kernel against quantized_activations(ref): the scales within
    one rounding of the compute dtype, every value within one code of the reference's."""
    ref_q, ref_d = quantized_activations(ref)
    assert torch.isfinite(xd).all() and (xd >= 0).all()
    assert ((xd - ref_d).abs() <= 8e-3 * ref_d + 1e-30).all()
    M = ref.shape[0]
    got = (xq.double().reshape(M, -1, 32) * xd.double()[..., None]).reshape(M, -1)
    want = (ref_q.double().reshape(M, -1, 32) * ref_d.double()[..., None]).reshape(M, -1)
    step = torch.maximum(xd, ref_d).double().repeat_interleave(32, dim=1)
    assert ((got - want).abs() <= 1.01 * step + 1e-30).all()
    assert (xq == ref_q).float().mean() >= 0.97  # a last-bit difference moves a few codes, not many
