"""Write small random-weight GGUF models that llama.cpp and leank both load.

Tests use them instead of downloads; benchmarks use them for a large model's shapes. The vocabulary is
a byte-level BPE (GPT-2 style: every byte is a token, plus a few merges and ChatML control tokens), so
llama.cpp tokenizes any text with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import MODEL_TENSOR as T

from leank.runtime.arch.base import tensor_name

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "a n"]


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte used by byte-level BPE vocabularies (GPT-2's scheme)."""
    direct = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols = {}
    extra = 0
    for b in range(256):
        if b in direct:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


@dataclass
class TinySpec:
    """Shapes and options of a random model. Defaults: a 2-layer GQA llama that runs in milliseconds."""

    arch: str = "llama"
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default dim // n_heads
    ffn_dim: int = 128
    context_length: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tied: bool = True
    rope_freqs: bool = False
    rope_scaling: tuple | None = None  # ("linear", factor) or ("yarn", factor, original_context)
    tensor_type: str = "F32"  # for 2-D weights; norms and biases stay F32 as llama.cpp writes them
    # per-tensor types by the name's kind ("ffn_down", "output", "token_embd", "attn_v", ...): e.g. the
    # Q6_K ffn_down and output of a Q4_K_M-like file
    type_overrides: dict = field(default_factory=dict)
    weight_scale: float = 0.08
    seed: int = 0
    vocab_size: int | None = None  # pad the vocabulary with unused tokens up to this size
    chat_template: str | None = CHATML
    add_bos: bool = False
    extra_metadata: dict = field(default_factory=dict)
    # Matrices tiled from one random block instead of drawn entry by entry: seconds instead of minutes
    # for a model of billions of weights (benchmarks that need only a large model's shapes).
    fast_weights: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


def _vocab(spec: TinySpec):
    tokens = byte_symbols() + [m.replace(" ", "") for m in MERGES]
    n_normal = len(tokens)
    if spec.vocab_size is not None:
        tokens += [f"<unused{i}>" for i in range(spec.vocab_size - n_normal - len(SPECIAL_TOKENS))]
    specials_at = len(tokens)
    tokens += SPECIAL_TOKENS
    types = [1] * specials_at + [3] * len(SPECIAL_TOKENS)
    return tokens, types, specials_at


def quantize_rows(array: np.ndarray, tensor_type: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: F32/F16 as-is, other types through gguf-py."""
    q = gguf.GGMLQuantizationType[tensor_type]
    if q == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), None
    if q == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), None
    try:
        return gguf.quants.quantize(array.astype(np.float32), q), q
    except NotImplementedError:
        return random_quant_blocks(array.shape, q, np.random.default_rng(int(abs(array).sum() * 1e3) % 2**32)), q


def random_quant_blocks(shape, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed blocks of a type gguf-py cannot quantize (the K-quants): random bits with
    every fp16 scale field set to a small finite value."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    small = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    # fp16 super-block scales sit at fixed offsets: Q4_K/Q5_K start with d, dmin; Q6_K/Q3_K/Q2_K end with d
    name = qtype.name
    if name in ("Q4_K", "Q5_K"):
        raw[..., 0:2] = small
        raw[..., 2:4] = small
    elif name in ("Q6_K", "Q3_K"):
        raw[..., -2:] = small
    elif name == "Q2_K":
        raw[..., -4:-2] = small
        raw[..., -2:] = small
    else:
        raise NotImplementedError(f"no random block recipe for {name}")
    return raw.reshape(rows, cols // block * type_size)


def write_tiny_model(path: str | Path, spec: TinySpec | None = None, **overrides) -> Path:
    """Write a random-weight GGUF for `spec` (or `TinySpec(**overrides)`) and return its path."""
    spec = spec or TinySpec(**overrides)
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    a, hd = spec.arch, spec.hd
    tokens, types, specials_at = _vocab(spec)
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), a)
    w.add_name(f"tiny-random-{a}")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(vocab)
    if spec.rope_scaling:
        kind = spec.rope_scaling[0]
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(spec.rope_scaling[1]))
        if len(spec.rope_scaling) > 2:
            w.add_rope_scaling_orig_ctx_len(int(spec.rope_scaling[2]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(specials_at)
    w.add_eos_token_id(specials_at + 2)  # <|im_end|> ends a turn
    w.add_add_bos_token(spec.add_bos)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)
    for key, value in spec.extra_metadata.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))

    block = None
    if spec.fast_weights:
        out_dtype = np.float16 if spec.tensor_type == "F16" else np.float32
        block = (rng.standard_normal(1 << 22) * spec.weight_scale).astype(out_dtype)

    def tiled(rows: int, cols: int, scale: float) -> np.ndarray:
        n = rows * cols
        start = int(rng.integers(0, block.size))
        reps = -(-(n + start) // block.size)
        flat = np.tile(block, reps)[start : start + n] if reps > 1 else block[start : start + n]
        return (flat * block.dtype.type(scale / spec.weight_scale)).reshape(rows, cols)

    def mat(rows: int, cols: int) -> np.ndarray:
        if block is not None:
            return tiled(rows, cols, spec.weight_scale)
        return (rng.standard_normal((rows, cols)) * spec.weight_scale).astype(np.float32)

    def add_matrix(name: str, array: np.ndarray) -> None:
        data, raw = quantize_rows(array, spec.type_overrides.get(name.split(".")[-2], spec.tensor_type))
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=raw)

    def add_vector(name: str, array: np.ndarray) -> None:
        w.add_tensor(name, array.astype(np.float32))

    if block is not None:
        emb = tiled(vocab, spec.dim, 0.5)
    else:
        emb = (rng.standard_normal((vocab, spec.dim)) * 0.5).astype(np.float32)
    add_matrix(tensor_name(T.TOKEN_EMBD), emb)
    add_vector(tensor_name(T.OUTPUT_NORM), 1.0 + 0.1 * rng.standard_normal(spec.dim))
    if not spec.tied:
        add_matrix(tensor_name(T.OUTPUT), mat(vocab, spec.dim))
    if spec.rope_freqs:
        add_vector(tensor_name(T.ROPE_FREQS), np.linspace(1.0, 8.0, hd // 2))
    qs, kvs = spec.n_heads * hd, spec.n_kv_heads * hd
    for i in range(spec.n_layers):
        add_vector(tensor_name(T.ATTN_NORM, i), 1.0 + 0.1 * rng.standard_normal(spec.dim))
        add_matrix(tensor_name(T.ATTN_Q, i), mat(qs, spec.dim))
        add_matrix(tensor_name(T.ATTN_K, i), mat(kvs, spec.dim))
        add_matrix(tensor_name(T.ATTN_V, i), mat(kvs, spec.dim))
        if a == "qwen2":
            add_vector(tensor_name(T.ATTN_Q, i, "bias"), 0.1 * rng.standard_normal(qs))
            add_vector(tensor_name(T.ATTN_K, i, "bias"), 0.1 * rng.standard_normal(kvs))
            add_vector(tensor_name(T.ATTN_V, i, "bias"), 0.1 * rng.standard_normal(kvs))
        if a == "qwen3":
            add_vector(tensor_name(T.ATTN_Q_NORM, i), 1.0 + 0.1 * rng.standard_normal(hd))
            add_vector(tensor_name(T.ATTN_K_NORM, i), 1.0 + 0.1 * rng.standard_normal(hd))
        add_matrix(tensor_name(T.ATTN_OUT, i), mat(spec.dim, qs))
        add_vector(tensor_name(T.FFN_NORM, i), 1.0 + 0.1 * rng.standard_normal(spec.dim))
        add_matrix(tensor_name(T.FFN_GATE, i), mat(spec.ffn_dim, spec.dim))
        add_matrix(tensor_name(T.FFN_UP, i), mat(spec.ffn_dim, spec.dim))
        add_matrix(tensor_name(T.FFN_DOWN, i), mat(spec.dim, spec.ffn_dim))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
