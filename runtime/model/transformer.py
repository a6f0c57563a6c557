"""A Llama-family transformer in plain torch, loaded from a GGUF file.

One class per block, the hot path visible: embed -> (RMSNorm, attention through the KV cache, RMSNorm,
SwiGLU) x n_layers -> RMSNorm -> logits. The cache decides how past keys and values are stored and
attended (`leank.runtime.cache.dense`); this file never looks inside it.
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from gguf.constants import MODEL_TENSOR
from torch import nn

from leank.errors import LeankError
from leank.kernels import cpu as cpu_kernels
from leank.kernels import ggml_cpu
from leank.runtime.arch.args import ModelArgs
from leank.runtime.arch.base import tensor_name
from leank.runtime.gguf.reader import GGUFFile
from leank.runtime.model.linear import CudaQuantLinear, Linear, QuantLinear, expansion_reason, make_linear, storage_mode
from leank.runtime.model.rope import Rope, RopeTables

EMBEDDINGS = tensor_name(MODEL_TENSOR.TOKEN_EMBD)

# Tokens pushed through the feed-forward at once during a long prefill: bounds the working set.
FFN_CHUNK_TOKENS = 2048

# Decode steps of up to this many sequences run as one ggml program on a CPU (`CpuDecodeStep`); each
# batch size seen gets its own: ~(n_layers dim + 5 dim + 3 F + 2 (Hq + 2 Hkv) D) 4 bytes a row (the residual
# stream of every layer, one segment's scratch, q|k|v), ~0.3 MiB a row on the 1.5B Qwen2.5-Coder.
CPU_STEP_MAX_ROWS = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # llama.cpp normalizes in float32 whatever the weight type
    if x.dtype == torch.float32:
        y = cpu_kernels.rms_norm(x, weight, eps)  # a decode step's vector: one C call, not six torch ops
        return F.rms_norm(x, weight.shape, weight, eps) if y is None else y
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.args, self.layer = args, layer
        self.q_size = args.n_heads * args.head_dim
        self.kv_size = args.n_kv_heads * args.head_dim
        self.wqkv: Linear | None = None  # fused (q | k | v) rows (and biases), set by the loader
        self.wo: Linear | None = None
        self.q_norm: torch.Tensor | None = None
        self.k_norm: torch.Tensor | None = None

    def qkv(self, x: torch.Tensor, rope: RopeTables):
        """Project and rotate: q (B, Hq, T, D), k and v (B, Hkv, T, D)."""
        B, T, _ = x.shape
        return self.rotate(self.wqkv(x), B, T, rope)

    def rotate(self, qkv: torch.Tensor, B: int, T: int, rope: RopeTables):
        """q, k, v from the projected (B, T, q | k | v) rows: split, normalized (qk_norm), rotated."""
        a = self.args
        v = qkv[..., self.q_size + self.kv_size :].view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if self.q_norm is None:
            # q and k heads rotate together: one RoPE pass instead of two (decoding is bound by op count)
            qk = qkv[..., : self.q_size + self.kv_size].view(B, T, a.n_heads + a.n_kv_heads, a.head_dim)
            qk = rope.apply(qk).transpose(1, 2)
            return qk[:, : a.n_heads], qk[:, a.n_heads :], v
        q, k = qkv[..., : self.q_size + self.kv_size].split((self.q_size, self.kv_size), dim=-1)
        q = rms_norm(q.view(B, T, a.n_heads, a.head_dim), self.q_norm, a.norm_eps)
        k = rms_norm(k.view(B, T, a.n_kv_heads, a.head_dim), self.k_norm, a.norm_eps)
        return rope.apply(q).transpose(1, 2), rope.apply(k).transpose(1, 2), v

    def forward(self, x: torch.Tensor, rope: RopeTables, cache) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope)
        cache.append(self.layer, k, v)
        out = cache.attend(self.layer, q)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_dim = args.ffn_dim
        self.w_gate_up: Linear | None = None  # fused (gate | up) rows
        self.w_down: Linear | None = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)
        return self.w_down(F.silu(gate_up[..., : self.ffn_dim]).mul_(gate_up[..., self.ffn_dim :]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T <= FFN_CHUNK_TOKENS:
            return self._forward(x)
        return torch.cat([self._forward(x[:, i : i + FFN_CHUNK_TOKENS]) for i in range(0, T, FFN_CHUNK_TOKENS)], 1)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.eps = args.norm_eps
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args)
        self.attn_norm = torch.empty(0)
        self.ffn_norm = torch.empty(0)
        self._norms32: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x, rope, cache):
        # .forward directly: nn.Module's call machinery costs more than a decode step's small layers
        h = x + self.attention.forward(rms_norm(x, self.attn_norm, self.eps), rope, cache)
        return h + self.feed_forward.forward(rms_norm(h, self.ffn_norm, self.eps))

    def fused_forward(self, x: torch.Tensor, positions: torch.Tensor, tables, cache, tl) -> torch.Tensor:
        """`forward` for one token per row x (B, dim) on CUDA with every matrix in GGUF blocks, in 12
        kernels besides the cache's (torch's ops took ~30): RMSNorm into the 8-bit activations, q|k|v
        (+ bias), RoPE of q and k, the cache, o + residual, RMSNorm, gate|up, SiLU * up into 8 bits,
        down + residual. `tables`: the RoPE (cos, sin) (P, D/2) float32; `tl`: `leank.kernels.tilelang_ops`."""
        att, ff, a = self.attention, self.feed_forward, self.attention.args
        B, Hq, Hkv, D = x.shape[0], a.n_heads, a.n_kv_heads, a.head_dim
        if self._norms32 is None:  # the norm weights as the fused kernel reads them
            self._norms32 = (self.attn_norm.float().contiguous(), self.ffn_norm.float().contiguous())
        attn_norm, ffn_norm = self._norms32
        qkv = att.wqkv.project(*tl.rmsnorm_qx(x, attn_norm, self.eps))
        q, k = tl.rope_qk(qkv, positions, *tables, Hq, Hkv, D, a.rope_mode == "neox")
        v = qkv[:, att.q_size + att.kv_size:].view(B, Hkv, 1, D)
        cache.append(att.layer, k.view(B, Hkv, 1, D), v)
        out = cache.attend(att.layer, q.view(B, Hq, 1, D)).reshape(B, att.q_size).contiguous()
        h = att.wo.project(*tl.quantize_x(out), residual=x)
        gate_up = ff.w_gate_up.project(*tl.rmsnorm_qx(h, ffn_norm, self.eps))
        return ff.w_down.project(*tl.silu_mul_qx(gate_up), residual=h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.args, self.device, self.dtype = args, device, dtype
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.tok_embeddings = torch.empty(0)  # (vocab, dim) lookup table, compute dtype or float16
        self.norm = torch.empty(0)
        self.output: Linear | None = None
        self.rope: Rope | None = None
        self._cpu_steps: dict[int, CpuDecodeStep | None] = {}  # rows -> its program (None: not eligible)
        self._fusable: bool | None = None  # the fused CUDA step applies (`fusable`), decided on first use
        self._norm32: torch.Tensor | None = None  # the final norm's weight in float32 (the fused step)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.tok_embeddings, CudaQuantLinear):  # ids checked on the host, except inside a capture
            return self.tok_embeddings.rows(tokens, checked=not torch.cuda.is_current_stream_capturing())
        if isinstance(self.tok_embeddings, QuantLinear):
            return self.tok_embeddings.rows(tokens)
        return F.embedding(tokens, self.tok_embeddings).to(self.dtype)

    def forward(self, tokens: torch.Tensor, cache, logits_for: str = "last") -> torch.Tensor:
        """Run `tokens` (B, T) after what `cache` holds; returns logits (B, T or 1, vocab) in float32.

        `logits_for`: "last" (the next-token distribution only), "all" (one row per position) or
        "none" (hidden states after the final norm, (B, T, dim), for training and calibration).
        """
        step = self._cpu_step(tokens, logits_for)
        if step is not None:
            return step.forward(tokens, cache)
        B, T = tokens.shape
        # sequences at their own lengths, one token each (the server; a captured step: a device tensor)
        positions = getattr(cache, "positions", None)
        if T == 1 and logits_for != "none" and self.fusable(B):
            return self._fused_step(tokens, positions, cache)
        rope = self.rope.tables(cache.seq_len, T) if positions is None else self.rope.tables_at(positions)
        x = self.embed(tokens)
        for block in self.layers:
            x = block.forward(x, rope, cache)
        if logits_for == "last":
            x = x[:, -1:]
        x = rms_norm(x, self.norm, self.args.norm_eps)
        if logits_for == "none":
            return x
        return self.output(x).float()

    def fusable(self, rows: int) -> bool:
        """Whether a decode step of `rows` sequences runs fused (`Block.fused_forward`): CUDA, half
        precision, every matrix in GGUF blocks (`CudaQuantLinear`), at most GEMV_ROWS rows, plain RoPE over
        whole heads, no q/k norms, not turned off (LEANK_CUDA_FUSED=0)."""
        if self._fusable is None:
            a = self.args
            mats = [self.output] + [m for b in self.layers for m in (b.attention.wqkv, b.attention.wo,
                                                                    b.feed_forward.w_gate_up, b.feed_forward.w_down)]
            self._fusable = (self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
                             and all(isinstance(m, CudaQuantLinear) for m in mats)
                             and all(b.attention.q_norm is None for b in self.layers)
                             and a.rope_dims == a.head_dim and a.rope_mode in ("neox", "interleaved")
                             and a.dim % 32 == 0 and a.ffn_dim % 32 == 0 and (a.n_heads * a.head_dim) % 32 == 0
                             and self.rope.dtype == torch.float32)
        return self._fusable and rows <= self.output._tl.GEMV_ROWS and not cpu_kernels.switched_off("LEANK_CUDA_FUSED")

    def _fused_step(self, tokens: torch.Tensor, positions, cache) -> torch.Tensor:
        """One token per row through `Block.fused_forward`: logits (B, 1, vocab) float32."""
        tl = self.output._tl
        B = tokens.shape[0]
        positions = self.rope.at([cache.seq_len] * B if positions is None else positions)
        tables = self.rope.full_tables()
        x = self.embed(tokens).reshape(B, self.args.dim).contiguous()
        for block in self.layers:
            x = block.fused_forward(x, positions, tables, cache, tl)
        if self._norm32 is None:
            self._norm32 = self.norm.float().contiguous()
        return self.output.project(*tl.rmsnorm_qx(x, self._norm32, self.args.norm_eps)).float().view(B, 1, -1)

    def _cpu_step(self, tokens: torch.Tensor, logits_for: str) -> CpuDecodeStep | None:
        """The ggml program for a CPU decode step of these `tokens` (one per sequence), or None."""
        B, T = tokens.shape
        if T != 1 or B > CPU_STEP_MAX_ROWS or logits_for == "none" or self.device.type != "cpu":
            return None
        if B not in self._cpu_steps:
            self._cpu_steps[B] = CpuDecodeStep.build(self, B)
        return self._cpu_steps[B]


class CpuDecodeStep:
    """A CPU decode step of `rows` sequences as one ggml program (`ggml_cpu.Program`): n_layers + 1
    graphs a step instead of four products, two norms and a dozen torch operations a layer.

    Segment 0: the first layer's RMSNorm and q|k|v products (and biases); segment l (1 <= l < n_layers):
    layer l-1's attention output product, residual add, RMSNorm, gate and up products, SwiGLU, down
    product, residual add, then layer l's RMSNorm and q|k|v; the last segment ends layer n-1 with the
    final norm and the logits. Between segments torch splits and rotates q|k|v (`Attention.rotate`) and
    the cache appends and attends, exactly as `Transformer.forward`; the residual stream stays in the
    program's memory. On SmolLM2 (30 layers) a step was 121 one-node graphs, each a build, a plan and a
    wake-up of ggml's workers, and ~20 torch operations a layer (bench/RESULTS.md, issue 16)."""

    SLOT_X, SLOT_ATTN, SLOT_QKV, SLOT_LOGITS, SLOT_POS = range(5)

    def __init__(self, model: Transformer, rows: int):
        a = model.args
        self.model, self.rows = model, rows
        self.q_size, self.kv_size = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        width = self.q_size + 2 * self.kv_size
        self.vocab = model.output.out_features
        self._cols: dict[int, int] = {}  # product node -> its columns
        P = self.program = ggml_cpu.Program(max_nodes=40 * a.n_layers + 64, max_segments=a.n_layers + 1, slots=5)
        # every layer's q|k|v rows: the cache copies k and v in `append` and reads q in `attend` before the
        # next segment writes them again
        self.qkv = torch.empty(rows, width)
        # RoPE (and q/k norms) in the program where ggml computes what `Rope` does; else torch's `Attention.rotate`
        self.rope = ggml_rope_args(a, model.rope)
        self.positions = torch.zeros(rows, dtype=torch.int32)
        pos = P.input_i32(self.SLOT_POS, rows)
        x = P.input(self.SLOT_X, a.dim, rows)
        for i, block in enumerate(model.layers):
            if i:
                x = self._finish_layer(model.layers[i - 1], x)
            xn = P.rms_norm(x, block.attn_norm, a.norm_eps)
            q, k, v = self._product(block.attention.wqkv, xn)
            if self.rope is not None:
                att = block.attention
                q = self._rotated(q, a.n_heads, att.q_norm, pos)
                k = self._rotated(k, a.n_kv_heads, att.k_norm, pos)
            for node, col in ((q, 0), (k, self.q_size), (v, self.q_size + self.kv_size)):
                P.bind(node, self.SLOT_QKV, ld=width, col=col)
            P.end_segment()
        x = self._finish_layer(model.layers[-1], x)
        xn = P.rms_norm(x, model.norm, a.norm_eps)
        col = 0
        for node in self._product(model.output, xn):
            P.bind(node, self.SLOT_LOGITS, ld=self.vocab, col=col)
            col += self._cols[node]
        P.end_segment()
        P.finish()
        self.ptrs = P.pointers()
        # q (B, Hq, 1, D), k and v (B, Hkv, 1, D): views of the q|k|v rows, as Attention.rotate gives them
        qs, kvs, D, t = self.q_size, self.kv_size, a.head_dim, self.qkv
        self.views = (t[:, :qs].view(rows, 1, a.n_heads, D).transpose(1, 2),
                      t[:, qs : qs + kvs].view(rows, 1, a.n_kv_heads, D).transpose(1, 2),
                      t[:, qs + kvs :].view(rows, 1, a.n_kv_heads, D).transpose(1, 2))

    def _product(self, lin: QuantLinear, x: int) -> list[int]:
        """x times each part of `lin`, its bias added: one node per part."""
        nodes, col = [], 0
        for node, (blocks, _) in zip(self.program.matmul(lin._ggml, x), lin.parts):
            n = blocks.shape[0]
            if lin.bias is not None:
                node = self.program.add(node, self.program.constant(lin.bias[col : col + n]))
            self._cols[node] = n
            nodes.append(node)
            col += n
        return nodes

    def _rotated(self, x: int, heads: int, norm: torch.Tensor | None, pos: int) -> int:
        """q or k (rows, heads * head_dim) RMS-normalized per head (qk_norm) and rotated at the positions."""
        P, a = self.program, self.model.args
        x = P.reshape(x, self.rows, heads, a.head_dim)
        if norm is not None:
            x = P.rms_norm(x, norm, a.norm_eps)
        return P.rope(x, pos, a.head_dim, **self.rope)

    def _finish_layer(self, block: Block, x: int) -> int:
        """The rest of `block` after its attention (read from SLOT_ATTN): the new residual stream."""
        P, eps = self.program, block.eps
        (o,) = self._product(block.attention.wo, P.input(self.SLOT_ATTN, self.q_size, self.rows))
        h = P.add(x, o)
        gate, up = self._product(block.feed_forward.w_gate_up, P.rms_norm(h, block.ffn_norm, eps))
        (down,) = self._product(block.feed_forward.w_down, P.swiglu(gate, up))
        return P.add(h, down)

    @staticmethod
    def eligible(model: Transformer) -> bool:
        """Every matrix multiplied by ggml, in float32 on a CPU, and the program not switched off
        (LEANK_GGML_PROGRAM=0)."""
        if model.device.type != "cpu" or model.dtype != torch.float32 or cpu_kernels.switched_off("LEANK_GGML_PROGRAM"):
            return False
        a = model.args
        lins = [model.output]
        for b in model.layers:
            lins += [b.attention.wqkv, b.attention.wo, b.feed_forward.w_gate_up, b.feed_forward.w_down]
        if not all(isinstance(m, QuantLinear) and m.kernel == "ggml" for m in lins):
            return False
        gu = [b.feed_forward.w_gate_up.parts for b in model.layers]
        qkv = [[blocks.shape[0] for blocks, _ in b.attention.wqkv.parts] for b in model.layers]
        return (all(len(p) == 2 and p[0][0].shape[0] == p[1][0].shape[0] == a.ffn_dim for p in gu)
                and all(rows == [a.n_heads * a.head_dim] + [a.n_kv_heads * a.head_dim] * 2 for rows in qkv))

    @classmethod
    def build(cls, model: Transformer, rows: int) -> CpuDecodeStep | None:
        return cls(model, rows) if cls.eligible(model) else None

    def forward(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, 1, vocab) for one new token per sequence, as `Transformer.forward`."""
        m, P, ptrs = self.model, self.program, self.ptrs
        B, T = tokens.shape
        positions = getattr(cache, "positions", None)  # as Transformer.forward
        if self.rope is None:
            rope = m.rope.tables(cache.seq_len, T) if positions is None else m.rope.tables_at(positions)
        elif positions is None:
            self.positions.fill_(cache.seq_len)
        else:
            self.positions.copy_(positions if torch.is_tensor(positions) else torch.tensor(positions, dtype=torch.int32))
        threads = torch.get_num_threads()
        x = m.embed(tokens).reshape(B, m.args.dim).float().contiguous()
        ptrs[self.SLOT_X] = x.data_ptr()
        ptrs[self.SLOT_POS] = self.positions.data_ptr()
        ptrs[self.SLOT_QKV] = self.qkv.data_ptr()
        P.run(0, ptrs, threads)
        n = len(m.layers)
        logits = torch.empty(B, T, self.vocab)
        for i in range(n):
            if self.rope is None:
                q, k, v = m.layers[i].attention.rotate(self.qkv.view(B, T, -1), B, T, rope)
            else:  # rotated by the program: views of its rows, made once
                q, k, v = self.views
            cache.append(i, k, v)
            out = cache.attend(i, q)  # (B, Hq, 1, D): contiguous, it is (B, Hq * D) as it lies
            if out.dtype != torch.float32 or not out.is_contiguous():
                out = out.float().contiguous()
            ptrs[self.SLOT_ATTN] = out.data_ptr()
            if i + 1 == n:
                ptrs[self.SLOT_LOGITS] = logits.data_ptr()
            P.run(i + 1, ptrs, threads)
        return logits


def ggml_rope_args(args: ModelArgs, rope: Rope) -> dict | None:
    """`rope`'s rotation as ggml_rope_ext's parameters (`ggml_cpu.Program.rope`), or None when it has none:
    the same frequencies (rope_freqs as ggml's freq factors), linear and YaRN scaling, in float32 angles
    as llama.cpp computes them (leank's tables are float64: ~1e-3 rad apart at 30K positions)."""
    if args.rope_dims != args.head_dim or rope.mode not in ("interleaved", "neox"):
        return None
    s, d = args.rope_scaling, args.rope_dims
    plain = args.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    factors = plain / rope.inv_freq
    yarn = s.kind == "yarn"
    return dict(neox=rope.mode == "neox", freq_base=args.rope_base, freq_scale=rope.freq_scale,
                ext_factor=s.yarn_ext_factor if yarn else 0.0, attn_factor=s.yarn_attn_factor if yarn else 1.0,
                beta_fast=s.yarn_beta_fast, beta_slow=s.yarn_beta_slow, n_ctx_orig=s.original_context or args.context_length,
                freq_factors=None if torch.equal(factors, torch.ones_like(factors)) else factors.float())


def load_transformer(f: GGUFFile, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                     weights: str = "auto", progress=None) -> Transformer:
    """Dequantize every weight of `f` into a `Transformer` on `device` in `dtype`.

    `weights` chooses how matrices are stored on a float32 CPU (see `leank.runtime.model.linear`)."""
    model = Transformer(args, device, dtype)

    def checked(name: str, shape: tuple[int, ...]):
        """The header entry of tensor `name`, which must have `shape` (torch order)."""
        t = f.tensors.get(name)
        if t is None:
            raise LeankError(f"{f.path}: tensor {name!r} is missing")
        if tuple(t.numpy_shape) != shape:
            raise LeankError(f"{f.path}: tensor {name!r} has shape {tuple(t.numpy_shape)}, expected {shape}")
        return t

    def w(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        checked(name, shape)
        t = f.load(name, dtype, device)
        if progress is not None:
            progress()
        return t

    def blocks(name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """Tensor `name` as its stored rows of quantized blocks: a view of the memory-mapped file, not a
        copy (read-only: nothing writes weights), so the file's pages are the weights' only memory."""
        t = checked(name, shape)
        with warnings.catch_warnings():  # torch warns that the array is read-only: it is meant to be
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(f.tensor_data(t))
        if progress is not None:
            progress()
        return data, int(t.tensor_type)

    def quantized(names: list[str], shapes: list[tuple[int, ...]]) -> list[tuple[torch.Tensor, int]]:
        """One part per tensor (q, k and v stay three parts: concatenating them would copy the file)."""
        return [blocks(n, s) for n, s in zip(names, shapes)]

    expanded: set[str] = set()  # quantized types a CUDA model holds in the compute dtype (said once)

    def linear(names: list[str], shapes: list[tuple[int, ...]], bias_names: list[str] | None = None) -> Linear:
        modes = {storage_mode(weights, f.tensor_type_name(n), device, dtype) for n in names}
        if device.type == "cuda" and weights in ("auto", "quantized"):
            expanded.update(t for t in map(f.tensor_type_name, names)
                            if t not in ("F32", "F16", "BF16") and (modes != {"quantized"}))
        mode = modes.pop() if len(modes) == 1 else "float16"
        bias = None
        if bias_names:
            bias = torch.cat([w(n, (s[0],)) for n, s in zip(bias_names, shapes)])
        if mode == "quantized" and device.type == "cuda":
            lin = CudaQuantLinear(quantized(names, shapes), shapes[0][1], bias, device, dtype)
        elif mode == "quantized":
            lin = QuantLinear(quantized(names, shapes), shapes[0][1], bias)
        else:
            weight = torch.cat([w(n, s) for n, s in zip(names, shapes)]) if len(names) > 1 else w(names[0], shapes[0])
            lin = make_linear(weight, bias, mode)
        # what was copied (dequantized, or repacked by ggml) leaves memory now, not at the end of loading:
        # the peak stays near the weights' size; blocks still multiplied in place fault back in when read
        f.release_pages(names)
        return lin

    a = args
    qs, kvs = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    emb_mode = storage_mode(weights, f.tensor_type_name(EMBEDDINGS), device, dtype)
    if emb_mode == "quantized":  # rows are decoded as tokens come: the table stays in its blocks
        parts = quantized([EMBEDDINGS], [(a.vocab_size, a.dim)])
        if device.type == "cuda":
            model.tok_embeddings = CudaQuantLinear(parts, a.dim, None, device, dtype)
            f.release_pages([EMBEDDINGS])  # uploaded: the file's pages are no longer needed
        else:
            model.tok_embeddings = QuantLinear(parts, a.dim)
        emb = None
    else:
        emb = w(EMBEDDINGS, (a.vocab_size, a.dim))
        # the lookup table only feeds one row per token: float16 halves its memory at no speed cost
        model.tok_embeddings = emb.half() if emb_mode == "float16" else emb
    model.norm = w(tensor_name(MODEL_TENSOR.OUTPUT_NORM), (a.dim,))
    if a.tied_embeddings:
        model.output = model.tok_embeddings if emb is None else make_linear(emb, None, emb_mode)
    else:
        model.output = linear([tensor_name(MODEL_TENSOR.OUTPUT)], [(a.vocab_size, a.dim)])
    del emb
    rope_freqs = w(tensor_name(MODEL_TENSOR.ROPE_FREQS), (a.rope_dims // 2,)).float().cpu() if a.has_rope_freqs else None
    model.rope = Rope(a, rope_freqs, device)
    T = MODEL_TENSOR
    for i, block in enumerate(model.layers):
        def n(kind, suffix="weight", i=i):
            return tensor_name(kind, i, suffix)

        att, ffn = block.attention, block.feed_forward
        block.attn_norm = w(n(T.ATTN_NORM), (a.dim,))
        block.ffn_norm = w(n(T.FFN_NORM), (a.dim,))
        att.wqkv = linear([n(T.ATTN_Q), n(T.ATTN_K), n(T.ATTN_V)], [(qs, a.dim), (kvs, a.dim), (kvs, a.dim)],
                          [n(T.ATTN_Q, "bias"), n(T.ATTN_K, "bias"), n(T.ATTN_V, "bias")] if a.qkv_bias else None)
        if a.qk_norm:
            att.q_norm = w(n(T.ATTN_Q_NORM), (a.head_dim,))
            att.k_norm = w(n(T.ATTN_K_NORM), (a.head_dim,))
        att.wo = linear([n(T.ATTN_OUT)], [(a.dim, qs)])
        ffn.w_gate_up = linear([n(T.FFN_GATE), n(T.FFN_UP)], [(a.ffn_dim, a.dim), (a.ffn_dim, a.dim)])
        ffn.w_down = linear([n(T.FFN_DOWN)], [(a.dim, a.ffn_dim)])
    if expanded:
        print(f"leank: {expansion_reason(sorted(expanded), dtype)}", file=sys.stderr)
    return model


def weight_tensor_names(args: ModelArgs) -> list[str]:
    """The tensors `load_transformer` reads (for progress bars): the architecture's tensor table."""
    return list(args.architecture.tensor_shapes(args))
