"""The dense cache: every past key and value kept as computed (see `leank.runtime.cache.base` for the
interface)."""
from __future__ import annotations

import torch

from leank.kernels import dispatch
from leank.runtime.cache.base import CacheBytes, KVCache, causal_attention, grow, kv_dtype, write_token


class DenseCache(KVCache):
    """Every past key and value kept as computed, in `kv_dtype(device, dtype)` (`dtype`: the model's
    compute dtype)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, batch: int = 1, *,
                 device="cpu", dtype=torch.float32, capacity: int = 0):
        self.n_layers, self.n_kv_heads, self.head_dim, self.batch = n_layers, n_kv_heads, head_dim, batch
        self.device, self.dtype = torch.device(device), dtype
        self.kv_dtype = kv_dtype(self.device, dtype)
        self.capacity_hint = capacity
        self.reset()

    def reset(self) -> None:
        self.k: list[torch.Tensor | None] = [None] * self.n_layers
        self.v: list[torch.Tensor | None] = [None] * self.n_layers
        self.lengths = [0] * self.n_layers

    @property
    def seq_len(self) -> int:
        return self.lengths[-1]

    def _alloc(self, cap: int) -> torch.Tensor:
        return torch.empty(self.batch, self.n_kv_heads, cap, self.head_dim, device=self.device, dtype=self.kv_dtype)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n, T = self.lengths[layer], k.shape[2]
        need = max(n + T, self.capacity_hint)
        self.k[layer] = grow(self.k[layer], n, need, self._alloc, 2)
        self.v[layer] = grow(self.v[layer], n, need, self._alloc, 2)
        self.k[layer][:, :, n : n + T] = k
        self.v[layer][:, :, n : n + T] = v
        self.lengths[layer] = n + T

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        n = self.lengths[layer]
        return causal_attention(q, self.k[layer][:, :, :n], self.v[layer][:, :, :n])

    # --- one decode step with lengths in device memory (`leank.runtime.graph`; see CompressedCache) -------
    def static_prepare(self) -> bool:
        """A buffer for every layer with room for the next token; whether one changed."""
        changed = False
        for layer in range(self.n_layers):
            n, k = self.lengths[layer], self.k[layer]
            if k is None or k.shape[2] < n + 1:
                self.k[layer] = grow(k, n, max(n + 1, self.capacity_hint), self._alloc, 2)
                self.v[layer] = grow(self.v[layer], n, max(n + 1, self.capacity_hint), self._alloc, 2)
                changed = True
        return changed

    def static_signature(self) -> tuple:
        return tuple((k.data_ptr(), k.shape[2], v.data_ptr()) for k, v in zip(self.k, self.v))

    def static_lengths(self) -> tuple[int, int]:
        return self.lengths[0], 0

    def static_append(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor) -> None:
        write_token(self.k[layer], at, k)
        write_token(self.v[layer], at, v)

    def static_attend(self, layer: int, q: torch.Tensor, full_lens: torch.Tensor, middle_lens: torch.Tensor,
                      with_middle: bool) -> torch.Tensor:
        # the compressed cache's full-region kernel: a dense cache is a full region and nothing else
        return dispatch.ops_for(self.device).compressed_attention(q, self.k[layer], self.v[layer], [], 0, 16, 16, 1,
                                                                  None, full_lens, middle_lens)

    def static_advance(self) -> bool:
        """After a replay: one more token (the next step's `static_prepare` makes room when it is full)."""
        self.lengths = [n + 1 for n in self.lengths]
        return False

    def truncate(self, n: int) -> None:
        """Forget every token after the first `n` (buffers are kept and overwritten by later appends)."""
        self.lengths = [min(length, n) for length in self.lengths]

    def nbytes(self) -> CacheBytes:
        per_elem = torch.finfo(self.kv_dtype).bits // 8
        used = sum(2 * self.batch * self.n_kv_heads * n * self.head_dim * per_elem for n in self.lengths)
        alloc = sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
        fp16 = sum(2 * self.batch * self.n_kv_heads * n * self.head_dim * 2 for n in self.lengths)
        return CacheBytes(tokens=self.seq_len, full=used, fp16_equivalent=fp16, allocated=alloc)
