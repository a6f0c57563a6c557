"""What an architecture module declares, and the tensor table every supported architecture shares.

An architecture is a GGUF `general.architecture` name plus what distinguishes its blocks: RoPE's
channel order, and which optional tensors its files carry (q/k/v biases, per-head q/k norms). Tensor
names are gguf-py's (`gguf.constants.TENSOR_NAMES`), never retyped.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of a tensor: `tensor_name(MODEL_TENSOR.ATTN_Q, 3)` is 'blk.3.attn_q.weight'."""
    base = TENSOR_NAMES[kind].format(bid=layer) if layer is not None else TENSOR_NAMES[kind]
    return f"{base}.{suffix}"


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str  # for `leank info`, errors and the README
    rope_mode: str  # "interleaved" (pairs 2i, 2i+1: llama-arch GGUFs permute Q/K rows) or "neox" (i, i + d/2)

    def tensor_shapes(self, args) -> dict[str, tuple[int, ...]]:
        """Every tensor the model reads, in the order the loader reads them, with its shape (torch
        order): the one table the loader, the shape check and progress bars use."""
        a = args
        qs, kvs = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        T = MODEL_TENSOR
        out = {tensor_name(T.TOKEN_EMBD): (a.vocab_size, a.dim), tensor_name(T.OUTPUT_NORM): (a.dim,)}
        if not a.tied_embeddings:
            out[tensor_name(T.OUTPUT)] = (a.vocab_size, a.dim)
        if a.has_rope_freqs:
            out[tensor_name(T.ROPE_FREQS)] = (a.rope_dims // 2,)
        for i in range(a.n_layers):
            out[tensor_name(T.ATTN_NORM, i)] = (a.dim,)
            out[tensor_name(T.FFN_NORM, i)] = (a.dim,)
            for kind, rows in ((T.ATTN_Q, qs), (T.ATTN_K, kvs), (T.ATTN_V, kvs)):
                out[tensor_name(kind, i)] = (rows, a.dim)
            if a.qkv_bias:
                for kind, rows in ((T.ATTN_Q, qs), (T.ATTN_K, kvs), (T.ATTN_V, kvs)):
                    out[tensor_name(kind, i, "bias")] = (rows,)
            if a.qk_norm:
                out[tensor_name(T.ATTN_Q_NORM, i)] = (a.head_dim,)
                out[tensor_name(T.ATTN_K_NORM, i)] = (a.head_dim,)
            out[tensor_name(T.ATTN_OUT, i)] = (a.dim, qs)
            out[tensor_name(T.FFN_GATE, i)] = (a.ffn_dim, a.dim)
            out[tensor_name(T.FFN_UP, i)] = (a.ffn_dim, a.dim)
            out[tensor_name(T.FFN_DOWN, i)] = (a.dim, a.ffn_dim)
        return out
