"""Model hyper-parameters read from GGUF metadata, one dataclass for every supported architecture."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from gguf.constants import MODEL_TENSOR
from gguf.constants import GGUFValueType as V

from leank.errors import LeankError
from leank.runtime.arch import get as get_architecture
from leank.runtime.arch import names as architecture_names
from leank.runtime.arch.base import Architecture, tensor_name
from leank.runtime.gguf.reader import ARRAY, STRING, GGUFFile

# Bounds on what a file may claim. Sizes are also checked against the tensors, which must lie in the file,
# so a crafted header cannot make leank build a model (or a mask, or RoPE tables) larger than the file.
MAX_PER_LAYER_ITEMS = 4096  # per-layer arrays (llama.cpp allows 512 layers)
MAX_CONTEXT = (1 << 32) - 1  # llama.cpp stores the training context as uint32
# Tokenizers llama.cpp runs for the supported architectures; the others (t5, bert, rwkv, no_vocab...) are
# refused before llama.cpp sees the file.
TOKENIZER_MODELS = ("gpt2", "llama")
# llama.cpp falls back to default special-token ids (SPM: 0-2, BPE: 11) and aborts the process when one
# lies beyond the vocabulary: a smaller vocabulary is refused.
MIN_VOCAB = 16

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
    def architecture(self) -> Architecture:
        return get_architecture(self.arch)

    @property
    def rope_mode(self) -> str:
        """'interleaved' (pairs 2i, 2i+1; llama-arch GGUFs) or 'neox' (pairs i, i + d/2)."""
        return self.architecture.rope_mode

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of K and V one token takes in a dense cache, over all layers (fp16: 2 bytes)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


def _short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a crafted key may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(f: GGUFFile, key: str, default=None, low: int = 0, high: int | None = None) -> int:
    value = f.get(key, default, max_items=MAX_PER_LAYER_ITEMS)
    if value is None:
        raise LeankError(f"{f.path}: metadata key {key!r} is missing")
    if isinstance(value, list):  # some files store per-layer arrays; all layers must agree for us
        if not value or len(set(value)) != 1:
            raise LeankError(f"{f.path}: {key!r} varies per layer, which leank does not support")
        value = value[0]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or int(value) != value):
        raise LeankError(f"{f.path}: metadata key {key!r} = {_short(value)} is not an integer")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"within [{low}, {high}]"
        raise LeankError(f"{f.path}: metadata key {key!r} = {value} must be {bound}")
    return value


def _float(f: GGUFFile, key: str, default=None, low: float = -math.inf, high: float = math.inf,
           positive: bool = False) -> float:
    """A finite number within [low, high] (and above 0 if `positive`)."""
    value = f.get(key, default, max_items=0)
    if value is None:
        raise LeankError(f"{f.path}: metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LeankError(f"{f.path}: metadata key {key!r} = {_short(value)} is not a number")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high or (positive and value <= 0):
        raise LeankError(f"{f.path}: metadata key {key!r} = {value!r} is out of range")
    return value


def read_model_args(f: GGUFFile) -> ModelArgs:
    """The model's hyper-parameters, checked: ranges, the tensors' shapes, and a vocabulary llama.cpp can
    load without crashing (see `check_vocabulary`). Every failure is one `LeankError`."""
    arch = f.architecture
    if get_architecture(arch) is None:
        raise LeankError(
            f"{f.path}: architecture {_short(arch)} is not supported; supported: {', '.join(architecture_names())}"
        )
    a = arch
    splits = f.get("split.count", 0, max_items=0)
    if splits not in (0, 1):
        raise LeankError(f"{f.path}: a split GGUF file (split.count {_short(splits)}) is not supported; "
                         "merge the parts first (llama-gguf-split --merge)")
    if _int(f, f"{a}.expert_count", 0) or _int(f, f"{a}.expert_used_count", 0):
        raise LeankError(f"{f.path}: mixture-of-experts models are not supported")
    n_layers = _int(f, f"{a}.block_count", low=1)
    dim = _int(f, f"{a}.embedding_length", low=1)
    n_heads = _int(f, f"{a}.attention.head_count", low=1)
    n_kv_heads = _int(f, f"{a}.attention.head_count_kv", n_heads, low=1)
    if n_heads % n_kv_heads:
        raise LeankError(f"{f.path}: {n_heads} query heads cannot share {n_kv_heads} KV heads")
    head_dim = _int(f, f"{a}.attention.key_length", dim // n_heads)
    if _int(f, f"{a}.attention.value_length", head_dim) != head_dim:
        raise LeankError(f"{f.path}: K and V head sizes differ, which leank does not support")
    if head_dim == 0 or head_dim % 2:
        raise LeankError(f"{f.path}: head size {head_dim} must be even")
    rope_dims = _int(f, f"{a}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise LeankError(f"{f.path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    embedding = tensor_name(MODEL_TENSOR.TOKEN_EMBD)
    if not f.has_tensor(embedding):
        raise LeankError(f"{f.path}: tensor '{embedding}' is missing")
    vocab_size = f.tensor_shape(embedding)[0]

    kind = f.get(f"{a}.rope.scaling.type", "none", max_items=0) or "none"
    if kind not in ("none", "linear", "yarn"):
        raise LeankError(f"{f.path}: RoPE scaling {_short(kind)} is not supported (none, linear, yarn are)")
    # llama.cpp reads a factor of 0 as "no scaling"
    factor = _float(f, f"{a}.rope.scaling.factor", 1.0, low=0.0, high=1e6) or 1.0
    if f"{a}.rope.scale_linear" in f.fields:  # older files
        kind, factor = "linear", _float(f, f"{a}.rope.scale_linear", positive=True, high=1e6)
    context_length = _int(f, f"{a}.context_length", 4096, low=1, high=MAX_CONTEXT)
    yarn = kind == "yarn"
    scaling = RopeScaling(
        kind=kind,
        factor=factor,
        original_context=_int(f, f"{a}.rope.scaling.original_context_length", context_length,
                              low=1 if yarn else 0, high=MAX_CONTEXT),
        yarn_ext_factor=_float(f, f"{a}.rope.scaling.yarn_ext_factor", 1.0 if yarn else 0.0, low=-1e6, high=1e6),
        yarn_attn_factor=_float(f, f"{a}.rope.scaling.yarn_attn_factor",
                                _float(f, f"{a}.rope.scaling.attn_factor", 1.0, low=-1e6, high=1e6), low=-1e6, high=1e6),
        # YaRN divides by both betas and takes their logarithms
        yarn_beta_fast=_float(f, f"{a}.rope.scaling.yarn_beta_fast", 32.0, high=1e6, positive=yarn),
        yarn_beta_slow=_float(f, f"{a}.rope.scaling.yarn_beta_slow", 1.0, high=1e6, positive=yarn),
    )
    rope_base = _float(f, f"{a}.rope.freq_base", 10000.0, high=1e30, positive=True)
    if yarn and rope_base == 1.0:  # YaRN divides by log(base)
        raise LeankError(f"{f.path}: RoPE base 1 cannot be used with YaRN scaling")
    args = ModelArgs(
        arch=arch,
        n_layers=n_layers,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=_int(f, f"{a}.feed_forward_length", low=1),
        vocab_size=vocab_size,
        context_length=context_length,
        norm_eps=_float(f, f"{a}.attention.layer_norm_rms_epsilon", 1e-5, low=0.0, high=1.0),
        rope_base=rope_base,
        rope_dims=rope_dims,
        rope_scaling=scaling,
        qkv_bias=f.has_tensor(tensor_name(MODEL_TENSOR.ATTN_Q, 0, "bias")),
        qk_norm=f.has_tensor(tensor_name(MODEL_TENSOR.ATTN_Q_NORM, 0)),
        tied_embeddings=not f.has_tensor(tensor_name(MODEL_TENSOR.OUTPUT)),
        has_rope_freqs=f.has_tensor(tensor_name(MODEL_TENSOR.ROPE_FREQS)),
    )
    check_tensor_shapes(f, args)
    check_vocabulary(f, vocab_size)
    return args


def check_tensor_shapes(f: GGUFFile, args: ModelArgs) -> None:
    """Every tensor the model reads exists with the shape the hyper-parameters imply.

    Tensors must lie inside the file, so this bounds every size in `args` by the file's size: no layer
    count, head count or width can make leank allocate more than the file describes."""
    a = args
    if a.n_layers > len(f.tensors):  # before the table: a crafted layer count must not build a huge one
        raise LeankError(f"{f.path}: {a.n_layers} layers claimed, but the file has only {len(f.tensors)} tensors")
    expected = a.architecture.tensor_shapes(a)
    for name, shape in expected.items():
        if not f.has_tensor(name):
            raise LeankError(f"{f.path}: tensor {name!r} is missing")
        if f.tensor_shape(name) != shape:
            raise LeankError(f"{f.path}: tensor {name!r} has shape {f.tensor_shape(name)}, expected {shape}")


def _llama_cpp_token(raw: bytes, i: int) -> bytes:
    # llama.cpp reads each token through a C string (cut at the first NUL) and renames empty ones
    raw = bytes(raw).split(b"\0", 1)[0]
    return raw or b"[EMPTY_%d]" % i


def check_vocabulary(f: GGUFFile, n_rows: int) -> None:
    """Refuse a vocabulary that llama.cpp (which tokenizes for leank) would crash on.

    llama.cpp aborts the whole process (no exception to catch) on: duplicate tokens (after its own
    NUL-cutting and renaming of empty ones), a token list or merges that are not string arrays, an SPM
    vocabulary without a token for some byte, a requested BOS/EOS token that does not exist, and token
    ids beyond the vocabulary (the model samples from `n_rows` embedding rows: they must match, as
    llama.cpp itself requires)."""
    where = f"{f.path}: tokenizer"
    model = f.get("tokenizer.ggml.model")
    if not isinstance(model, str) or model not in TOKENIZER_MODELS:
        raise LeankError(f"{where} model {_short(model)} is not supported ({', '.join(TOKENIZER_MODELS)} are)")
    tokens = f.raw_strings("tokenizer.ggml.tokens")
    if tokens is None:
        raise LeankError(f"{where}: tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    if n != n_rows:
        raise LeankError(f"{where}: the vocabulary has {n} tokens but the embedding {n_rows} rows")
    if n < MIN_VOCAB:
        raise LeankError(f"{where}: a vocabulary of {n} tokens is too small (at least {MIN_VOCAB})")
    # llama.cpp reads these as raw float/int arrays of n items, whatever their declared type and length
    for key, etypes, what in (("tokenizer.ggml.scores", (V.FLOAT32,), "float32"),
                              ("tokenizer.ggml.token_type", (V.INT32, V.UINT32), "int32")):
        field = f.fields.get(key)
        if field is not None and (field.type != ARRAY or field.sub_type not in etypes or field.count != n):
            raise LeankError(f"{where}: {key} must be an array of {n} {what}")
    merges = f.fields.get("tokenizer.ggml.merges")
    if (merges is None and model == "gpt2") or (merges is not None and merges.types != [ARRAY, STRING]):
        raise LeankError(f"{where}: tokenizer.ggml.merges is missing or not a list of strings")
    seen = {_llama_cpp_token(t, i) for i, t in enumerate(tokens)}
    if len(seen) != n:
        raise LeankError(f"{where}: the vocabulary holds duplicate tokens")
    if model == "llama":  # SPM falls back to byte tokens for text it has no token for
        missing = [b for b in range(256) if b"<0x%02X>" % b not in seen and bytes([b]) not in seen]
        if missing:
            raise LeankError(f"{where}: the SPM vocabulary has no token for byte 0x{missing[0]:02X}")
    for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
        if f.get(f"tokenizer.ggml.{flag}", max_items=0) is True:
            token = f.get(f"tokenizer.ggml.{key}", max_items=0)
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < n:
                raise LeankError(f"{where}: tokenizer.ggml.{flag} is set but tokenizer.ggml.{key} "
                                 f"({_short(token)}) names no token")
