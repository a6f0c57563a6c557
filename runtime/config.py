"""Model hyper-parameters read from GGUF metadata, one dataclass for every supported architecture."""
from __future__ import annotations

from dataclasses import dataclass, field

from leank.errors import LeankError
from leank.runtime.gguf_file import GGUFFile

# Architectures leank runs, with what distinguishes them from plain llama.
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama 2/3, Mistral, SmolLM (interleaved RoPE on permuted Q/K rows)",
    "qwen2": "Qwen2/Qwen2.5 (q/k/v biases, rotate-half RoPE)",
    "qwen3": "Qwen3 dense (per-head q/k RMSNorm, rotate-half RoPE)",
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as llama.cpp applies it (`{arch}.rope.scaling.*`)."""

    kind: str = "none"  # none | linear | yarn
    factor: float = 1.0
    original_context: int = 0
    yarn_ext_factor: float = 1.0
    yarn_attn_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_dims: int
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = False
    has_rope_freqs: bool = False

    @property
    def rope_mode(self) -> str:
        """'interleaved' (pairs 2i, 2i+1; llama-arch GGUFs) or 'neox' (pairs i, i + d/2)."""
        return "interleaved" if self.arch == "llama" else "neox"

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of K and V one token takes in a dense cache, over all layers (fp16: 2 bytes)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


def _int(f: GGUFFile, key: str, default=None) -> int:
    value = f.get(key, default)
    if value is None:
        raise LeankError(f"{f.path}: metadata key {key!r} is missing")
    if isinstance(value, list):  # some files store per-layer arrays; all layers must agree for us
        if not value or len(set(value)) != 1:
            raise LeankError(f"{f.path}: {key!r} varies per layer, which leank does not support")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise LeankError(f"{f.path}: metadata key {key!r} = {value!r} is not a non-negative integer")
    return int(value)


def _float(f: GGUFFile, key: str, default=None) -> float:
    value = f.get(key, default)
    if value is None:
        raise LeankError(f"{f.path}: metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LeankError(f"{f.path}: metadata key {key!r} = {value!r} is not a number")
    return float(value)


def read_model_args(f: GGUFFile) -> ModelArgs:
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LeankError(
            f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    a = arch
    n_layers = _int(f, f"{a}.block_count")
    dim = _int(f, f"{a}.embedding_length")
    n_heads = _int(f, f"{a}.attention.head_count")
    n_kv_heads = _int(f, f"{a}.attention.head_count_kv", n_heads)
    if n_heads == 0 or n_kv_heads == 0 or n_heads % n_kv_heads:
        raise LeankError(f"{f.path}: {n_heads} query heads cannot share {n_kv_heads} KV heads")
    head_dim = _int(f, f"{a}.attention.key_length", dim // n_heads if n_heads else 0)
    if _int(f, f"{a}.attention.value_length", head_dim) != head_dim:
        raise LeankError(f"{f.path}: K and V head sizes differ, which leank does not support")
    if head_dim == 0 or head_dim % 2:
        raise LeankError(f"{f.path}: head size {head_dim} must be even")
    rope_dims = _int(f, f"{a}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise LeankError(f"{f.path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    if not f.has_tensor("token_embd.weight"):
        raise LeankError(f"{f.path}: tensor 'token_embd.weight' is missing")
    vocab_size = f.tensor_shape("token_embd.weight")[0]

    kind = f.get(f"{a}.rope.scaling.type", "none") or "none"
    if kind not in ("none", "linear", "yarn"):
        raise LeankError(f"{f.path}: RoPE scaling {kind!r} is not supported (none, linear, yarn are)")
    factor = _float(f, f"{a}.rope.scaling.factor", 1.0) or 1.0
    if f.get(f"{a}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", _float(f, f"{a}.rope.scale_linear")
    context_length = _int(f, f"{a}.context_length", 4096)
    scaling = RopeScaling(
        kind=kind,
        factor=factor,
        original_context=_int(f, f"{a}.rope.scaling.original_context_length", context_length),
        yarn_ext_factor=_float(f, f"{a}.rope.scaling.yarn_ext_factor", 1.0 if kind == "yarn" else 0.0),
        yarn_attn_factor=_float(f, f"{a}.rope.scaling.yarn_attn_factor", _float(f, f"{a}.rope.scaling.attn_factor", 1.0)),
        yarn_beta_fast=_float(f, f"{a}.rope.scaling.yarn_beta_fast", 32.0),
        yarn_beta_slow=_float(f, f"{a}.rope.scaling.yarn_beta_slow", 1.0),
    )
    args = ModelArgs(
        arch=arch,
        n_layers=n_layers,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=_int(f, f"{a}.feed_forward_length"),
        vocab_size=vocab_size,
        context_length=context_length,
        norm_eps=_float(f, f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=_float(f, f"{a}.rope.freq_base", 10000.0),
        rope_dims=rope_dims,
        rope_scaling=scaling,
        qkv_bias=f.has_tensor("blk.0.attn_q.bias"),
        qk_norm=f.has_tensor("blk.0.attn_q_norm.weight"),
        tied_embeddings=not f.has_tensor("output.weight"),
        has_rope_freqs=f.has_tensor("rope_freqs.weight"),
    )
    if n_layers == 0 or dim == 0 or args.ffn_dim == 0:
        raise LeankError(f"{f.path}: model has a zero size (layers {n_layers}, width {dim}, ffn {args.ffn_dim})")
    return args
