"""The compressed KV cache: LeanK channel pruning and KIVI quantization of the middle region.

Per layer, tokens live in two regions (see `leank.runtime.cache.policy`):
- the full region, in the compute dtype: the first `sink_tokens`, then the most recent tokens;
- the middle region: tokens that left the recent window, `block_tokens` at a time, stored per head
  group (KV heads keeping the same number of K channels) as `leank.kernels.reference.MiddleGroup`:
  K of kept channels only, V of every channel, each KIVI-quantized or (16 bits) kept exactly in the
  compute dtype. Heads that keep no channel
  store no middle K or V at all.
After each `attend`, whole blocks beyond `recent_tokens` move from the full region to the middle: the
new tokens' queries have seen their dense keys by then, so a prompt is always attended densely.

With `policy.rotate`, K and V are stored turned by orthonormal Hadamard transforms, in both regions:
V by one D x D transform H (the attention output is turned back: o = o' H), K and the queries by a
per-head transform that mixes kept channels only with kept channels (blocks of the kept channels,
in order, of the largest power of 2 dividing their count), so the kept channels' dot products, and
with them LeanK's pruned scores, are unchanged. Quantization then meets no outlier channel. The
kernels see ordinary K, V and queries: nothing in them changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from leank.kernels import dispatch
from leank.kernels.quant import hadamard, packed_width
from leank.kernels.reference import MiddleGroup, gather_channels
from leank.runtime.cache.base import (QUERY_CHUNK, CacheBytes, KVCache, causal_attention, grow, kv_dtype,
                                     write_token)
from leank.runtime.cache.mask import Mask
from leank.runtime.cache.policy import CachePolicy


def head_groups(mask_layer: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For one layer's mask (Hkv, D): [(heads, channels (nh, c))] for each kept count c > 0, ascending."""
    counts = mask_layer.sum(-1)
    groups = []
    for c in sorted(set(counts.tolist())):
        if c == 0:
            continue
        heads = torch.nonzero(counts == c).flatten()
        channels = torch.stack([torch.nonzero(mask_layer[h]).flatten() for h in heads.tolist()])
        groups.append((heads, channels))
    return groups


def key_rotation(mask_layer: torch.Tensor) -> torch.Tensor:
    """For one layer's mask (Hkv, D): per head an orthonormal (D, D) transform that maps the kept
    channels' subspace onto itself (Hadamard blocks over the kept channels, identity elsewhere)."""
    Hkv, D = mask_layer.shape
    out = torch.eye(D).repeat(Hkv, 1, 1)
    for h in range(Hkv):
        kept = torch.nonzero(mask_layer[h]).flatten()
        c = kept.numel()
        if c < 2:
            continue
        b = c & -c  # the largest power of 2 dividing c: 16 for 48 kept channels, 64 for 64
        hb = hadamard(b)
        for s0 in range(0, c, b):
            idx = kept[s0 : s0 + b]
            out[h][idx[:, None], idx[None, :]] = hb
    return out


@dataclass
class _Layer:
    full_k: torch.Tensor | None = None
    full_v: torch.Tensor | None = None
    full_len: int = 0
    middle_len: int = 0
    groups: list[MiddleGroup] = field(default_factory=list)


class CompressedCache(KVCache):
    """`capacity`: tokens per sequence to reserve the middle region's buffers for at their first
    allocation (0: grow as tokens come). A CUDA-graph decode step (`leank.runtime.graph`) is captured
    over the buffers; a buffer that grows later costs one new capture."""

    def __init__(self, policy: CachePolicy, args, batch: int = 1, *, device="cpu", dtype=torch.float32,
                 capacity: int = 0):
        policy.validate(args.n_layers, args.n_kv_heads, args.head_dim)
        self.policy, self.args, self.batch = policy, args, batch
        self.capacity = capacity
        self.n_layers, self.n_kv_heads, self.head_dim = args.n_layers, args.n_kv_heads, args.head_dim
        self.device, self.dtype = torch.device(device), dtype
        self.kv_dtype = kv_dtype(self.device, dtype)  # the full region's and unquantized middle's storage
        self.mask = policy.mask if policy.mask is not None else Mask.ones(args.n_layers, args.n_kv_heads, args.head_dim)
        self.scale = 1.0 / math.sqrt(args.head_dim)  # LeanK keeps the full head size's scale
        self.ops = dispatch.ops_for(self.device)
        self._group_specs = [[(h.to(self.device), c.to(self.device)) for h, c in head_groups(self.mask.kept[i])]
                             for i in range(self.n_layers)]
        self.rot_v = self.rot_k = None
        if policy.rotate:
            self.rot_v = hadamard(args.head_dim, dtype, self.device)
            self.rot_k = [key_rotation(self.mask.kept[i]).to(self.device, dtype) for i in range(self.n_layers)]
        self.reset()

    def reset(self) -> None:
        self.layers = [_Layer() for _ in range(self.n_layers)]

    @property
    def _steady_tokens(self) -> int:
        """The full region's working size in decoding: sink, recent window and two blocks."""
        p = self.policy
        return p.sink_tokens + p.recent_tokens + 2 * p.block_tokens

    @property
    def seq_len(self) -> int:
        last = self.layers[-1]
        return last.full_len + last.middle_len

    def truncate(self, n: int) -> bool:
        """Forget every token after the first `n` if they all sit in the full region after the middle
        (recent tokens: a reply to be regenerated); False, and nothing changed, when some were compressed."""
        floor = max(st.middle_len + (self.policy.sink_tokens if st.middle_len else 0) for st in self.layers)
        if n < floor:
            return False
        for st in self.layers:
            st.full_len = min(st.full_len, n - st.middle_len)
        return True

    # --- append / attend -----------------------------------------------------------------------------
    def _alloc_full(self, cap: int) -> torch.Tensor:
        return torch.empty(self.batch, self.n_kv_heads, cap, self.head_dim, device=self.device, dtype=self.kv_dtype)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.rot_v is not None:  # in the compute dtype: K/V may come from a float16 CPU cache (`compress_cache`)
            k, v = k.to(self.dtype), v.to(self.dtype)
            k = torch.matmul(k, self.rot_k[layer].unsqueeze(0))  # (B, Hkv, T, D) @ (1, Hkv, D, D)
            v = torch.matmul(v, self.rot_v)
        st = self.layers[layer]
        n, T = st.full_len, k.shape[2]
        st.full_k = grow(st.full_k, n, n + T, self._alloc_full, 2)
        st.full_v = grow(st.full_v, n, n + T, self._alloc_full, 2)
        st.full_k[:, :, n : n + T] = k
        st.full_v[:, :, n : n + T] = v
        st.full_len = n + T

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self._rotated(layer, q, self._attend)

    def _rotated(self, layer: int, q: torch.Tensor, attend) -> torch.Tensor:
        """attend(layer, q) with the queries turned as the layer's keys and the output turned back."""
        if self.rot_v is None:
            return attend(layer, q)
        B, Hq, T, D = q.shape  # query head h reads KV head h // (Hq // Hkv): turn it as that head's keys
        qr = torch.matmul(q.reshape(B, self.n_kv_heads, -1, T, D), self.rot_k[layer].view(1, self.n_kv_heads, 1, D, D))
        return torch.matmul(attend(layer, qr.reshape(B, Hq, T, D)), self.rot_v)  # H is symmetric: H^-1 = H

    # --- one decode step with lengths in device memory (`leank.runtime.graph`) --------------------------
    # The step runs as one CUDA-graph replay, so nothing in it may read a length on the host: the new
    # token's K/V are written at a device index, the kernels read the lengths from device tensors and
    # see the buffers' capacities. Moving blocks into the middle region happens between replays
    # (`static_advance`), where the host lengths are true again.
    def static_prepare(self) -> bool:
        """Make the buffers a decode step writes hold the steady state, so that captures stay valid.
        Returns whether a buffer changed."""
        steady = self._steady_tokens
        changed = False
        for st in self.layers:
            if st.full_k is None or st.full_k.shape[2] < steady:
                n = st.full_len
                st.full_k = grow(st.full_k, n, steady, self._alloc_full, 2)
                st.full_v = grow(st.full_v, n, steady, self._alloc_full, 2)
                changed = True
        return changed

    def static_signature(self) -> tuple:
        """What a captured step depends on: every buffer's address and size."""
        sig = []
        for st in self.layers:
            sig += [st.full_k.data_ptr(), st.full_k.shape[2]]
            for g in st.groups:
                for t in (g.k, g.k_scale, g.k_min, g.v, g.v_scale, g.v_min):
                    sig.append(None if t is None else (t.data_ptr(), t.shape[2]))
        return tuple(sig)

    def static_lengths(self) -> tuple[int, int]:
        """(full, middle) tokens every layer holds now (the host's truth between steps)."""
        st = self.layers[0]
        return st.full_len, st.middle_len

    def static_append(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor) -> None:
        """Write one token's k, v (B, Hkv, 1, D) at full-region index `at` ((B,) int64 on the device)."""
        if self.rot_v is not None:
            k = torch.matmul(k.to(self.dtype), self.rot_k[layer].unsqueeze(0))
            v = torch.matmul(v.to(self.dtype), self.rot_v)
        st = self.layers[layer]
        write_token(st.full_k, at, k)
        write_token(st.full_v, at, v)

    def static_attend(self, layer: int, q: torch.Tensor, full_lens: torch.Tensor, middle_lens: torch.Tensor,
                      with_middle: bool) -> torch.Tensor:
        """One query token (B, Hq, 1, D) over the capacity buffers, lengths from device tensors (B,) int32."""
        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            st, p = self.layers[layer], self.policy
            groups = st.groups if with_middle else []
            cap = self._middle_capacity(groups)
            return self.ops.compressed_attention(q, st.full_k, st.full_v, groups, cap, p.k_bits, p.v_bits,
                                                 p.group_size, self.scale, full_lens, middle_lens)
        return self._rotated(layer, q, attend)

    def _middle_capacity(self, groups: list[MiddleGroup]) -> int:
        """Tokens every buffer of `groups` has room for (K's scales: whole groups of tokens)."""
        G = self.policy.group_size
        cap = min((g.k.shape[2] for g in groups), default=0)
        if self.policy.k_bits < 16:
            cap = min([cap] + [g.k_scale.shape[2] * G for g in groups]) // G * G
        return cap

    def static_advance(self) -> bool:
        """After a replay: every layer holds one more token; whole blocks move to the middle region.
        Returns whether any did (buffers may have changed: the caller looks at `static_signature` again)."""
        for st in self.layers:
            st.full_len += 1
        p, st = self.policy, self.layers[0]
        if st.full_len - p.sink_tokens - p.recent_tokens < p.block_tokens:  # every layer holds the same lengths
            return False
        for layer in range(self.n_layers):
            self._compact(layer)
        return True

    def _attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        st = self.layers[layer]
        T = q.shape[2]
        fk, fv = st.full_k[:, :, : st.full_len], st.full_v[:, :, : st.full_len]
        if st.middle_len == 0:
            out = causal_attention(q, fk, fv, self.scale)
        elif T == 1:
            out = self.ops.compressed_attention(q, fk, fv, st.groups, st.middle_len, self.policy.k_bits,
                                                self.policy.v_bits, self.policy.group_size, self.scale)
        else:  # several new tokens after a compressed past (a later chat turn): bound the score matrix
            out = torch.empty_like(q)
            F = st.full_len
            for i0 in range(0, T, QUERY_CHUNK):
                i1 = min(T, i0 + QUERY_CHUNK)
                end = F - T + i1  # the chunk's queries are the last keys of full[:end]
                out[:, :, i0:i1] = self.ops.compressed_attention(
                    q[:, :, i0:i1], fk[:, :, :end], fv[:, :, :end], st.groups, st.middle_len,
                    self.policy.k_bits, self.policy.v_bits, self.policy.group_size, self.scale)
        self._compact(layer)
        return out

    # --- moving tokens to the middle --------------------------------------------------------------------
    def _compact(self, layer: int) -> None:
        p, st = self.policy, self.layers[layer]
        S = p.sink_tokens
        over = st.full_len - S - p.recent_tokens
        if over < p.block_tokens:
            return
        n = over // p.block_tokens * p.block_tokens
        k_move = st.full_k[:, :, S : S + n]
        v_move = st.full_v[:, :, S : S + n]
        if not st.groups:
            st.groups = [self._new_group(h, c) for h, c in self._group_specs[layer]]
        keep = st.full_len - S - n
        if not self._compact_in_c(st, S, n, keep):
            for g in st.groups:
                self._store(g, st.middle_len, n, gather_channels(k_move[:, g.heads], g.channels), v_move[:, g.heads])
            # shift the recent tokens down over the moved ones (the regions may overlap: clone)
            st.full_k[:, :, S : S + keep] = st.full_k[:, :, S + n : S + n + keep].clone()
            st.full_v[:, :, S : S + keep] = st.full_v[:, :, S + n : S + n + keep].clone()
        st.middle_len += n
        st.full_len = S + keep
        steady = self._steady_tokens
        if st.full_k.shape[2] > 2 * steady:  # after a long prefill: give the dense working set back
            st.full_k = st.full_k[:, :, :steady].clone()
            st.full_v = st.full_v[:, :, :steady].clone()

    def _new_group(self, heads: torch.Tensor, channels: torch.Tensor) -> MiddleGroup:
        return MiddleGroup(heads, channels, None, None)  # buffers are allocated by the first _store

    def _compact_in_c(self, st: _Layer, S: int, n: int, keep: int) -> bool:
        """`_compact`'s stores and shift in one call of the C ops (CPU): every group's K and V quantized
        straight from the full region into its buffers, then the recent tokens moved down in place (on
        SmolLM2 the torch path took 1.4 ms a layer, 0.5 ms with only the quantizer in C: the rest was the
        Python and the copies around it). False where the C ops are not used or do not take it."""
        compact = getattr(self.ops, "compact_layer", None)
        if compact is None:
            return False
        p = self.policy
        for g in st.groups:
            self._reserve(g, st.middle_len, n, self.batch, g.heads.numel(), g.n_channels)
        return compact(st.full_k, st.full_v, S, n, keep, st.groups, st.middle_len, p.k_bits, p.v_bits, p.group_size)

    def _reserve(self, g: MiddleGroup, start: int, n: int, B: int, nh: int, c: int) -> None:
        """Grow the group's buffers (geometrically; the first time to `capacity`) to hold tokens [0, start + n),
        keeping the first `start`."""
        p = self.policy
        G, D, end, dev = p.group_size, self.head_dim, start + n, self.device

        def buf(old, shape_tail, dtype, per_token=1):
            def alloc(cap):
                return torch.empty(B, nh, cap, *shape_tail, device=dev, dtype=dtype)
            used, need = start // per_token, end // per_token
            if old is None:  # the first allocation reserves `capacity` (less the sink, never in the middle)
                need = max(need, (self.capacity - p.sink_tokens) // per_token)
            return grow(old, used, need, alloc, 2)

        if p.k_bits == 16:  # not quantized: kept as the full region keeps it
            g.k = buf(g.k, (c,), self.kv_dtype)
        else:
            g.k = buf(g.k, (packed_width(c, p.k_bits),), torch.uint8)
            g.k_scale = buf(g.k_scale, (c,), torch.float16, G)
            g.k_min = buf(g.k_min, (c,), torch.float16, G)
        if p.v_bits == 16:
            g.v = buf(g.v, (D,), self.kv_dtype)
        else:
            g.v = buf(g.v, (packed_width(D, p.v_bits),), torch.uint8)
            g.v_scale = buf(g.v_scale, (D // G,), torch.float16)
            g.v_min = buf(g.v_min, (D // G,), torch.float16)

    def _store(self, g: MiddleGroup, start: int, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize n tokens' K (B, nh, n, c) and V (B, nh, n, D) into the group at token `start`."""
        p = self.policy
        G = p.group_size
        B, nh, _, c = k.shape
        end = start + n
        self._reserve(g, start, n, B, nh, c)
        if p.k_bits == 16:  # not quantized: kept as the full region keeps it
            g.k[:, :, start:end] = k
        else:
            codes, scale, mn = self.ops.quantize_k(k.to(self.dtype), p.k_bits, G)
            g.k[:, :, start:end] = codes
            g.k_scale[:, :, start // G : end // G] = scale
            g.k_min[:, :, start // G : end // G] = mn
        if p.v_bits == 16:
            g.v[:, :, start:end] = v
        else:
            codes, scale, mn = self.ops.quantize_v(v.to(self.dtype), p.v_bits, G)
            g.v[:, :, start:end] = codes
            g.v_scale[:, :, start:end] = scale
            g.v_min[:, :, start:end] = mn

    # --- accounting ------------------------------------------------------------------------------------
    def nbytes(self) -> CacheBytes:
        """Bytes of the stored tokens, region by region, from the tensors' element sizes."""
        out = CacheBytes(tokens=self.seq_len)
        for st in self.layers:
            if st.full_k is not None:
                out.full += 2 * st.full_k[:, :, : st.full_len].numel() * st.full_k.element_size()
                out.allocated += (st.full_k.numel() + st.full_v.numel()) * st.full_k.element_size()
            M = st.middle_len
            G = self.policy.group_size
            for g in st.groups:
                out.middle_k += g.k[:, :, :M].numel() * g.k.element_size()
                out.middle_v += g.v[:, :, :M].numel() * g.v.element_size()
                for s, per in ((g.k_scale, G), (g.k_min, G), (g.v_scale, 1), (g.v_min, 1)):
                    if s is not None:
                        out.scales += s[:, :, : M // per].numel() * s.element_size()
                for t in (g.k, g.v, g.k_scale, g.k_min, g.v_scale, g.v_min):
                    if t is not None:
                        out.allocated += t.numel() * t.element_size()
            out.fp16_equivalent += 2 * self.batch * self.n_kv_heads * self.head_dim * 2 * (st.full_len + M)
        out.extra["middle_tokens"] = self.layers[-1].middle_len
        out.extra["full_tokens"] = self.layers[-1].full_len
        return out


def compress_cache(dense, policy: CachePolicy, args) -> CompressedCache:
    """The compressed cache that prefilling `dense`'s tokens under `policy` would have produced.

    Prefill attention is dense under every policy (compression happens after a layer's attention), so
    one dense prefill can serve several policies: evaluation compares policies this way.
    """
    out = CompressedCache(policy, args, dense.batch, device=dense.device, dtype=dense.dtype)
    for layer in range(dense.n_layers):
        n = dense.lengths[layer]
        if n:
            out.append(layer, dense.k[layer][:, :, :n], dense.v[layer][:, :, :n])
            out._compact(layer)
    return out
