"""What running a model takes in memory, before anything is allocated: its weights as this device holds
them, its KV caches under a policy (`leank.runtime.cache.plan`) and the working set of a forward pass.
The memory planner (`leank info --memory`, `leank chat --memory`, `leank serve --memory`) adds them up
for each candidate policy and keeps the least compressed one that fits the budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from gguf.constants import MODEL_TENSOR

from leank.errors import LeankError
from leank.kernels.reference import MIDDLE_CHUNK
from leank.runtime.arch.base import tensor_name
from leank.runtime.cache.base import QUERY_CHUNK, kv_dtype
from leank.runtime.cache.plan import sequence_nbytes
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.model.linear import (QUANT_DIRECT_ROWS, CudaQuantLinear, Linear, QuantLinear, fp16_kernels_available,
                                       storage_mode)
from leank.runtime.model.transformer import EMBEDDINGS, FFN_CHUNK_TOKENS


# --- weights ----------------------------------------------------------------------------------------------
def weights_nbytes(transformer) -> int:
    """The bytes of a transformer's weights as it holds them; storage two parts share (tied embeddings
    kept as one float32 or GPU matrix) counted once."""
    seen, total = set(), 0
    parts = [transformer.tok_embeddings, transformer.output, transformer.norm]
    for b in transformer.layers:
        a, f = b.attention, b.feed_forward
        parts += [b.attn_norm, b.ffn_norm, a.wqkv, a.wo, a.q_norm, a.k_norm, f.w_gate_up, f.w_down]
    for x in parts:
        if x is None:
            continue
        if isinstance(x, torch.Tensor):
            key = (x.device, x.data_ptr())
        elif type(x) is Linear:  # a plain weight: may be the embedding table itself
            key = (x.weight.device, x.weight.data_ptr())
        else:
            key = id(x)
        if key in seen:
            continue
        seen.add(key)
        total += x.nbytes if isinstance(x, Linear) else x.numel() * x.element_size()
    return total


def decoded_matrix_nbytes(transformer) -> int:
    """The largest layer matrix kept in quantized blocks, as the float32 copy a prefill decodes it to
    (`QuantLinear` multiplies more than a few rows through a decoded copy); 0 when none is quantized."""
    sizes = [0]
    for b in transformer.layers:
        for m in (b.attention.wqkv, b.attention.wo, b.feed_forward.w_gate_up, b.feed_forward.w_down):
            if isinstance(m, QuantLinear):
                sizes.append(m.out_features * m.k * 4)
            elif isinstance(m, CudaQuantLinear):
                sizes.append(m.decoded_nbytes)
    return max(sizes)


class WeightsPlan(NamedTuple):
    nbytes: int  # what `weights_nbytes` of the loaded transformer reports
    decoded_matrix: int  # what `decoded_matrix_nbytes` reports


def planned_weights(f, args, device: torch.device, dtype: torch.dtype, weights: str = "auto") -> WeightsPlan:
    """The weights' bytes `leank.load(..., device, dtype, weights)` will hold, from the GGUF header alone.

    It makes the choices `load_transformer` makes (`storage_mode`): on a float32 CPU, blocks of a type
    the C kernels multiply stay as they are (their file bytes), F32 stays float32, other types become
    float16 (FBGEMM's packed matrices; the embedding table as a float16 tensor); elsewhere every weight
    is in the compute dtype. The tests hold it equal to `weights_nbytes` of loaded models."""
    e = torch.finfo(dtype).bits // 8
    fp16_packs = device.type == "cpu" and dtype == torch.float32 and fp16_kernels_available()

    def tensor(name: str):
        t = f.tensors.get(name)
        if t is None:
            raise LeankError(f"{f.path}: tensor {name!r} is missing")
        return t

    def mode(names: list[str]) -> str:
        modes = {storage_mode(weights, f.tensor_type_name(n), device, dtype) for n in names}
        return modes.pop() if len(modes) == 1 else "float16"

    decoded = [0]

    def linear(names: list[str], bias_names: list[str] | None = None, decodes: bool = True) -> int:
        """Bytes of the `Linear` `load_transformer` makes of `names` (stacked rows) and their biases;
        `decodes`: a prefill multiplies it by many rows (a layer's matrix, not the output's one row)."""
        n = sum(tensor(x).n_elements for x in names)
        bias = sum(tensor(x).n_elements for x in bias_names or [])
        m = mode(names)
        if m == "quantized" and device.type == "cuda":  # `CudaQuantLinear`: slices of at most DECODE_CHUNK
            rows = sum(tensor(x).numpy_shape[0] for x in names)
            k = tensor(names[0]).numpy_shape[1]
            if decodes:
                decoded[0] = max(decoded[0], min(rows, max(1, CudaQuantLinear.DECODE_CHUNK // k)) * k * e)
            return sum(tensor(x).n_bytes for x in names) + bias * e
        if m == "quantized" and decodes:
            decoded[0] = max(decoded[0], n * 4)
        if m == "quantized":
            return sum(tensor(x).n_bytes for x in names) + bias * 4
        if m == "float16" and fp16_packs:
            return n * 2 + bias * 4
        return (n + bias) * e

    a, T = args, MODEL_TENSOR
    total = tensor(tensor_name(T.OUTPUT_NORM)).n_elements * e
    emb, emb_mode = tensor(EMBEDDINGS), storage_mode(weights, f.tensor_type_name(EMBEDDINGS), device, dtype)
    if emb_mode == "quantized":
        total += emb.n_bytes  # tied: the output matrix is the same blocks
    else:
        total += emb.n_elements * (2 if emb_mode == "float16" else e)
        if a.tied_embeddings and emb_mode == "float16" and fp16_packs:
            total += emb.n_elements * 2  # the output matrix packed for FBGEMM: a second copy
        elif a.tied_embeddings and emb_mode == "float16":
            total += emb.n_elements * e  # a float32 output matrix beside the float16 lookup table
        # tied otherwise: one matrix, both the table and the output (counted once)
    if not a.tied_embeddings:
        total += linear([tensor_name(T.OUTPUT)], decodes=False)
    for i in range(a.n_layers):
        total += 2 * tensor(tensor_name(T.ATTN_NORM, i)).n_elements * e
        qkv = [tensor_name(k, i) for k in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)]
        biases = [tensor_name(k, i, "bias") for k in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)] if a.qkv_bias else None
        total += linear(qkv, biases)
        if a.qk_norm:
            total += 2 * a.head_dim * e
        total += linear([tensor_name(T.ATTN_OUT, i)])
        total += linear([tensor_name(T.FFN_GATE, i), tensor_name(T.FFN_UP, i)])
        total += linear([tensor_name(T.FFN_DOWN, i)])
    return WeightsPlan(total, decoded[0])


# --- the working set --------------------------------------------------------------------------------------
def working_set_nbytes(args, context: int, *, rows: int | None = None, batch: int = 1,
                       policy: CachePolicy | None = None, compute_bytes: int = 4, cache_bytes: int = 2,
                       decoded_matrix: int = 0) -> int:
    """An estimate of the bytes a forward pass holds besides the weights and the caches, at its peak:
    the larger of a prefill of `rows` prompt tokens (default: the whole `context` in one pass, as
    `leank chat` feeds a prompt; the server feeds `PREFILL_CHUNK` at a time) and a decode step of
    `batch` sequences, each over `context` keys, under cache `policy` (None: dense).

    With T = rows, S = context, Tq = min(T, QUERY_CHUNK) queries attended at once, e = compute_bytes
    (4: float32 on a CPU), c = cache_bytes, Hq/Hkv query/KV heads of D channels, dim the width, F the
    feed-forward width, V the vocabulary:

      prefill = hidden + max(attention, feed-forward) + decoded + V 4 (the last position's logits)
        hidden         4 T dim e               residual stream, its norm, the attention output, the sum
        attention      2 T (Hq + 2 Hkv) D e    q|k|v and their rotated copy
                     + 2 T Hq D e              attention output and its transposed copy
                     + 2 T Hkv D c             the new tokens in full precision before compaction
                     + max(dense, compressed)
          dense        Tq S 5                  the causal mask, as bools and as the float SDPA adds
                     + 2 S Hkv D e             a layer's cached K and V in the compute dtype (c != e)
          compressed   3 Hq Tq (M + R) 4       a prompt after a compressed past: scores, their exp and
                                               the weighted sum over M = min(S - Tq, MIDDLE_CHUNK)
                                               middle tokens, then R = sink + recent + block + Tq full
                                               ones (when S - Tq > sink + recent: a middle can exist)
        feed-forward   3 min(T, FFN_CHUNK_TOKENS) F e   gate|up and the gated product
        decoded        `decoded_matrix` when T > QUANT_DIRECT_ROWS (a quantized matrix as float32)
      decode = batch (4 dim + 2 (Hq + 2 Hkv) D + 2 Hq D + 3 F) e    one token's activations a sequence
             + batch 3 V 4                     logits and sampling's softmax and sorted copies
             + 2 Hq S 4                        one sequence's attention scores and weights
             + `decoded_matrix` when batch > QUANT_DIRECT_ROWS
             + batch (n_layers dim + 5 dim + 3 F + 2 (Hq + 2 Hkv) D) 4   a CPU's decode program
                                               (e = 4; `model.transformer.CpuDecodeStep`: every layer's
                                               residual stream, one segment's scratch, q|k|v)

    Checked on the 135M default model on a CPU at 8192 tokens, against the tensors alive at the peak
    (counted with a torch dispatch hook): a whole-context prompt, dense, 139 MiB (estimate 233 MiB);
    a 512-token chunk after 7680 compressed tokens, leank+kivi, 288 MiB (estimate 296 MiB). The
    process's peak RSS is higher still (malloc keeps freed blocks: about twice the tensors for a 4096-token
    prompt); that slack and the Python process itself are not counted."""
    a, e, c = args, compute_bytes, cache_bytes
    S = context
    T = min(S, rows if rows is not None else S)
    Tq = min(T, QUERY_CHUNK)
    Hq, Hkv, D, F = a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim
    hidden = 4 * T * a.dim * e
    scores = Tq * S * 5 + (2 * S * Hkv * D * e if c != e else 0)
    past = S - Tq  # the most tokens a prompt's last Tq queries can find cached before it
    if policy is not None and not policy.is_dense and past > policy.sink_tokens + policy.recent_tokens:
        full = policy.sink_tokens + policy.recent_tokens + policy.block_tokens + Tq
        scores = max(scores, 3 * Hq * Tq * (min(past, MIDDLE_CHUNK) + full) * 4)
    attention = 2 * T * (Hq + 2 * Hkv) * D * e + 2 * T * Hq * D * e + 2 * T * Hkv * D * c + scores
    feed_forward = 3 * min(T, FFN_CHUNK_TOKENS) * F * e
    prefill = (hidden + max(attention, feed_forward) + (decoded_matrix if T > QUANT_DIRECT_ROWS else 0)
               + a.vocab_size * 4)
    decode = (batch * (4 * a.dim + 2 * (Hq + 2 * Hkv) * D + 2 * Hq * D + 3 * F) * e + batch * 3 * a.vocab_size * 4
              + 2 * Hq * S * 4 + (decoded_matrix if batch > QUANT_DIRECT_ROWS else 0))
    if e == 4:  # a float32 CPU model decodes through one ggml program per batch size
        decode += batch * (a.n_layers * a.dim + 5 * a.dim + 3 * F + 2 * (Hq + 2 * Hkv) * D) * 4
    return max(prefill, decode)


# --- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryRow:
    """One candidate policy's bytes at the planned context, against the budget."""

    name: str
    policy: CachePolicy
    weights: int
    cache: int  # every sequence's cache together (`parallel` of them)
    working_set: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.working_set

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def margin(self) -> int:
        """Bytes left under the budget (negative: over it)."""
        return self.budget - self.total

    def as_dict(self) -> dict:
        return {"name": self.name, "policy": self.policy.describe(), "weights_bytes": self.weights,
                "kv_cache_bytes": self.cache, "working_set_bytes": self.working_set, "total_bytes": self.total,
                "fits": self.fits, "margin_bytes": self.margin}


def loaded_weights(transformer) -> WeightsPlan:
    """What `planned_weights` foresees, read from a loaded transformer."""
    return WeightsPlan(weights_nbytes(transformer), decoded_matrix_nbytes(transformer))


def plan_memory(candidates: Sequence[tuple[str, CachePolicy]], args, weights: WeightsPlan, *, device,
                dtype: torch.dtype, budget: int, context: int, parallel: int = 1,
                rows: int | None = None) -> list[MemoryRow]:
    """A `MemoryRow` per (name, policy) candidate, in their order: the weights, `parallel` caches of
    `context` tokens each (`sequence_nbytes`, the full region in `kv_dtype`) and the working set
    (`working_set_nbytes` of a `rows`-token prefill, `parallel` sequences decoding) on `device` in `dtype`."""
    device = torch.device(device)
    cache_bytes = torch.finfo(kv_dtype(device, dtype)).bits // 8
    rows_out = []
    for name, policy in candidates:
        working = working_set_nbytes(args, context, rows=rows, batch=parallel, policy=policy,
                                     compute_bytes=torch.finfo(dtype).bits // 8, cache_bytes=cache_bytes,
                                     decoded_matrix=weights.decoded_matrix)
        cache = parallel * sequence_nbytes(policy, args, context, cache_bytes)
        rows_out.append(MemoryRow(name, policy, weights.nbytes, cache, working, budget))
    return rows_out


def first_fitting(rows: Sequence[MemoryRow]) -> MemoryRow | None:
    """The first row (the least compressed, in the planner's order) that fits its budget."""
    return next((r for r in rows if r.fits), None)
