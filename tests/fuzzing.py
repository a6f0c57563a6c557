"""Fuzz leank's readers of untrusted files: GGUF models, LeanK .pth and .tsv masks, native mask files.

    nice -n 10 python bench/fuzz.py --minutes 15 --out /tmp/leank-fuzz      # a long run; prints a summary
    nice -n 10 python bench/fuzz.py --minutes 1 --target tokenizer          # one target only

Seeds are valid tiny files made here (random-weight GGUF models of three architectures, one with
`leank.*` metadata and a mask, one with an SPM vocabulary; masks in every importable format). Each input
is a seed mutated at the byte level (bit flips, interesting integers written over header bytes,
insertions, deletions, truncation) or at the structure level (metadata values re-encoded with other
types and edge values, arrays resized, tokens duplicated or cut by NULs, tensor dims/types/offsets/names
changed, header counts changed). Every target must end in success or one `LeankError` line:

- load: `GGUFFile` + `read_model_args` + the embedded policy, then the weights (`leank.load`);
- inspect: `leank.convert.convert.inspect_file`;
- convert: `convert(..., "ones")` into an empty directory: afterwards the directory holds nothing or one
  output that reads back with its policy;
- tokenizer: a file leank accepts is handed to llama.cpp (vocab only), which tokenizes, detokenizes every
  token and renders the chat template, in a forked child: a signal (a native crash) is a finding;
- pth, tsv, safetensors: the mask importers.

Anything else (another exception, a multi-line error, more than --timeout seconds, RSS growing by more
than --max-rss-growth-mb) is a finding: the input is saved under --out/findings with its traceback.
The functions here are also what `tests/test_fuzz.py` runs, CI-sized, under hypothesis; `bench/fuzz.py`
runs `main` for long.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# --- GGUF encoding ------------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
                  U64: "<Q", I64: "<q", F64: "<d"}
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 4095, 4096, 65535, 65536,
                    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1, -1, -2**31, -2**63]
INTERESTING_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-5, 3.4e38, 1e30, 1e300, math.nan, math.inf, -math.inf]
# keys leank or llama.cpp read: mutations pick these more often than others
KEYS_OF_INTEREST = [
    "general.architecture", "general.alignment", "general.name", "split.count",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token", "tokenizer.chat_template", "tokenizer.ggml.precompiled_charsmap",
    "{a}.block_count", "{a}.context_length", "{a}.embedding_length", "{a}.feed_forward_length",
    "{a}.attention.head_count", "{a}.attention.head_count_kv", "{a}.attention.key_length",
    "{a}.attention.value_length", "{a}.attention.layer_norm_rms_epsilon", "{a}.rope.dimension_count",
    "{a}.rope.freq_base", "{a}.rope.scaling.type", "{a}.rope.scaling.factor", "{a}.rope.scale_linear",
    "{a}.rope.scaling.original_context_length", "{a}.rope.scaling.yarn_beta_fast", "{a}.rope.scaling.yarn_beta_slow",
    "{a}.rope.scaling.yarn_ext_factor", "{a}.rope.scaling.attn_factor", "{a}.expert_count", "{a}.expert_used_count",
    "leank.version", "leank.fingerprint", "leank.mask.shape", "leank.mask.bits", "leank.mask.channel_order",
    "leank.mask.method", "leank.mask.ratio", "leank.mask.align", "leank.mask.source", "leank.mask.steps",
    "leank.mask.extra", "leank.cache.k_bits", "leank.cache.v_bits", "leank.cache.group_size",
    "leank.cache.sink_tokens", "leank.cache.recent_tokens", "leank.cache.block_tokens",
]
STRINGS_OF_INTEREST = [b"", b"llama", b"qwen2", b"qwen3", b"gpt2", b"no_vocab", b"t5", b"bert", b"rwkv", b"none",
                       b"linear", b"yarn", b"longrope", b"gguf", b"hf", b"default", b"glm4", b"llama3", b"qwen2",
                       b"tekken", b"\0", b"a\0b", b"\xff\xfe", b"[EMPTY_0]", b"<|im_end|>", b"{}", b"[" * 5000,
                       b'{"a": [1]}', b"x" * 70000, b"sha256:00"]


def enc_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def enc_scalar(vtype: int, value) -> bytes:
    if vtype == STR:
        return enc_str(value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass"))
    fmt = SCALAR_FORMATS[vtype]
    if fmt[-1] == "d":
        return struct.pack(fmt, float(value))
    if fmt[-1] == "f":  # beyond float32's range: stored as infinity, as a converter would
        value = float(value)
        return struct.pack(fmt, value if abs(value) < 3.4e38 or not math.isfinite(value) else math.copysign(math.inf, value))
    size = struct.calcsize(fmt)
    return (int(value) % (1 << (8 * size))).to_bytes(size, "little")  # wrap, as a crafted file would hold


def enc_record(key: bytes, vtype: int, value, sub: int | None = None, count: int | None = None) -> bytes:
    """A metadata record: key, type, value (`value` a list for arrays; `count` may lie about its length)."""
    body = struct.pack("<I", vtype)
    if vtype == ARR:
        body += struct.pack("<IQ", sub, len(value) if count is None else count)
        body += b"".join(enc_scalar(sub, v) for v in value)
    elif vtype in SCALAR_FORMATS or vtype == STR:
        body += enc_scalar(vtype, value)
    else:  # an unknown type: some bytes after it
        body += bytes(8)
    return enc_str(key) + body


@dataclass
class GGUFParts:
    """A GGUF file taken apart, so that mutations can change one piece and rebuild the rest."""

    version: int
    records: list[tuple[str, bytes]]  # (key, the whole record as stored)
    tensors: list[dict]  # name (bytes), dims (list), type, offset
    data: bytes  # the data section
    alignment: int
    arch: str

    def build(self, n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
        out = bytearray(b"GGUF" + struct.pack("<IQQ", self.version,
                                              len(self.tensors) if n_tensors is None else n_tensors,
                                              len(self.records) if n_kv is None else n_kv))
        for _, rec in self.records:
            out += rec
        for t in self.tensors:
            out += enc_str(t["name"]) + struct.pack("<I", len(t["dims"]))
            out += b"".join(struct.pack("<Q", d % 2**64) for d in t["dims"])
            out += struct.pack("<IQ", t["type"] % 2**32, t["offset"] % 2**64)
        out += bytes((-len(out)) % self.alignment)
        return bytes(out + self.data)


def split_gguf(data: bytes, path_hint: str = "seed.gguf") -> GGUFParts:
    """Take a valid GGUF apart with leank's own reader."""
    from leank.runtime.gguf.reader import GGUFFile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / path_hint
        p.write_bytes(data)
        f = GGUFFile(p)
        records = [(name, f.raw_bytes(fl.offset, fl.nbytes)) for name, fl in f.fields.items()]
        tensors = [dict(name=t.name.encode(), dims=list(t.shape), type=int(t.tensor_type), offset=t.data_offset - f.data_start)
                   for t in f.tensors.values()]
        parts = GGUFParts(f.version, records, tensors, data[f.data_start:], f.alignment, f.architecture)
        f._map.close()
    return parts


# --- choices: random for the long run, hypothesis in the tests -------------------------------------------
class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def raw(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    def coin(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


def some_int(c) -> int:
    return c.choice(INTERESTING_INTS) if c.coin(0.8) else c.integer(-2**63, 2**64 - 1)


def some_value(c, keep_type: int | None = None):
    """(vtype, value, sub, count) of a value to store: interesting scalars, strings, arrays."""
    vtype = keep_type if keep_type is not None and c.coin(0.5) else c.choice([U8, I8, U16, I16, U32, I32, F32, BOOL, STR,
                                                                             ARR, U64, I64, F64, 13, 99])
    if vtype == STR:
        return vtype, c.choice(STRINGS_OF_INTEREST) if c.coin(0.8) else c.raw(c.integer(0, 40)), None, None
    if vtype in (F32, F64):
        return vtype, c.choice(INTERESTING_FLOATS), None, None
    if vtype == ARR:
        sub = c.choice([U8, I32, U32, F32, STR, U64, ARR, 13])
        if sub == ARR or sub == 13:
            return vtype, [], sub, c.integer(0, 3)
        n = c.choice([0, 1, 2, 3, 4, 30, 300])
        item = (lambda: c.choice(STRINGS_OF_INTEREST[:12])) if sub == STR else \
            (lambda: c.choice(INTERESTING_FLOATS)) if sub == F32 else (lambda: some_int(c))
        values = [item() for _ in range(n)]
        count = None if c.coin(0.85) else some_int(c) % 2**64
        return vtype, values, sub, count
    return vtype, some_int(c), None, None


def _key_index(parts: GGUFParts, key: str) -> int | None:
    return next((i for i, (k, _) in enumerate(parts.records) if k == key), None)


def _string_array(parts: GGUFParts, key: str) -> list[bytes] | None:
    i = _key_index(parts, key)
    if i is None:
        return None
    rec = parts.records[i][1]
    try:  # an earlier mutation may have left anything here
        at = 8 + struct.unpack_from("<Q", rec)[0]
        vtype, sub, count = struct.unpack_from("<IIQ", rec, at)
        if vtype != ARR or sub != STR or count > len(rec):
            return None
        at += 16
        out = []
        for _ in range(count):
            n = struct.unpack_from("<Q", rec, at)[0]
            out.append(rec[at + 8 : at + 8 + n])
            at += 8 + n
        return out
    except struct.error:
        return None


def _set(parts: GGUFParts, key: str, record: bytes) -> None:
    i = _key_index(parts, key)
    if i is None:
        parts.records.append((key, record))
    else:
        parts.records[i] = (key, record)


def mutate_gguf(parts: GGUFParts, c) -> bytes:
    """One to three structure-level mutations of a copy of `parts`, rebuilt into bytes."""
    p = GGUFParts(parts.version, list(parts.records), [dict(t) for t in parts.tensors], parts.data, parts.alignment,
                  parts.arch)
    n_kv = n_tensors = None
    for _ in range(c.integer(1, 3)):
        op = c.integer(0, 11)
        if op <= 2:  # set a value, usually of a key leank or llama.cpp reads
            key = c.choice(KEYS_OF_INTEREST).format(a=p.arch) if c.coin(0.8) else c.choice(p.records)[0]
            i = _key_index(p, key)
            old_type = None if i is None else struct.unpack_from("<I", p.records[i][1], 8 + len(key.encode()))[0]
            vtype, value, sub, count = some_value(c, old_type)
            _set(p, key, enc_record(key.encode(), vtype, value, sub, count))
        elif op == 3 and p.records:  # drop or duplicate a record
            i = c.integer(0, len(p.records) - 1)
            if c.coin():
                del p.records[i]
            else:
                p.records.insert(c.integer(0, len(p.records)), p.records[i])
        elif op == 4:  # tokens: duplicates, NULs, empty tokens, another length
            tokens = _string_array(p, "tokenizer.ggml.tokens")
            if tokens:
                i, j = c.integer(0, len(tokens) - 1), c.integer(0, len(tokens) - 1)
                how = c.integer(0, 4)
                if how == 0:
                    tokens[i] = tokens[j]
                elif how == 1:
                    tokens[i] = tokens[i][:1] + b"\0" + c.raw(2)
                elif how == 2:
                    tokens[i] = b""
                elif how == 3:
                    tokens = tokens[: c.integer(0, len(tokens))]
                else:
                    tokens[i] = c.raw(c.integer(1, 6))
                _set(p, "tokenizer.ggml.tokens", enc_record(b"tokenizer.ggml.tokens", ARR, tokens, STR))
        elif op == 5:  # an SPM vocabulary (byte fallback) with or without its byte tokens
            tokens = _string_array(p, "tokenizer.ggml.tokens")
            if tokens and len(tokens) >= 256:
                if c.coin():
                    tokens[:256] = [b"<0x%02X>" % b for b in range(256)]
                    if c.coin(0.3):
                        tokens[c.integer(0, 255)] = b"<0x"
                _set(p, "tokenizer.ggml.tokens", enc_record(b"tokenizer.ggml.tokens", ARR, tokens, STR))
                _set(p, "tokenizer.ggml.model", enc_record(b"tokenizer.ggml.model", STR, b"llama"))
                if c.coin():
                    types = [c.choice([1, 2, 3, 4, 5, 6, 0, -1, 99]) for _ in tokens]
                    _set(p, "tokenizer.ggml.token_type", enc_record(b"tokenizer.ggml.token_type", ARR, types, I32))
        elif op <= 8 and p.tensors:  # a tensor's dims, type, offset, name
            t = c.choice(p.tensors)
            what = c.integer(0, 4)
            if what == 0:
                t["dims"] = [some_int(c) if c.coin(0.3) else d for d in t["dims"]]
                if c.coin(0.2):
                    t["dims"] = t["dims"] + [c.choice([1, 2, 0])] if c.coin() else t["dims"][:-1]
            elif what == 1:
                t["type"] = c.integer(0, 45) if c.coin(0.8) else some_int(c)
            elif what == 2:
                t["offset"] = some_int(c) if c.coin(0.5) else t["offset"] + c.choice([-32, -1, 1, 32, 4096])
            elif what == 3:
                other = c.choice(p.tensors)["name"]
                t["name"] = c.choice([other, other + b"\0", b"x" * 64, b"\xff" + other, b"", b"blk.\xc2\xb2.attn_k.weight",
                                      b"blk.99.attn_k.weight"])
            else:
                p.tensors.remove(t)
        elif op == 9:  # header counts
            if c.coin():
                n_kv = max(0, len(p.records) + c.choice([-1, 1, 2**20, 2**40, 2**63])) % 2**64
            else:
                n_tensors = max(0, len(p.tensors) + c.choice([-1, 1, 2**20, 2**40, 2**63])) % 2**64
        elif op == 10:  # version, data section
            if c.coin(0.3):
                p.version = c.choice([0, 1, 2, 3, 4, 2**24, 2**32 - 1])
            else:
                cut = c.integer(0, len(p.data))
                p.data = p.data[:cut] if c.coin() else p.data + c.raw(c.integer(1, 64))
        else:  # leank metadata: a forged mask or policy on a converted file
            key = c.choice([k for k in KEYS_OF_INTEREST if k.startswith("leank.")])
            vtype, value, sub, count = some_value(c)
            _set(p, key, enc_record(key.encode(), vtype, value, sub, count))
    return p.build(n_kv, n_tensors)


def mutate_bytes(data: bytes, c, hot_end: int | None = None) -> bytes:
    """One to four byte-level mutations; most land in [0, hot_end) (a GGUF's header)."""
    b = bytearray(data)
    for _ in range(c.integer(1, 4)):
        if not b:
            b += c.raw(c.integer(1, 16))
            continue
        end = len(b) if hot_end is None or c.coin(0.1) else max(1, min(hot_end, len(b)))
        at = c.integer(0, end - 1)
        op = c.integer(0, 6)
        if op == 0:
            b[at] ^= 1 << c.integer(0, 7)
        elif op == 1:
            b[at] = c.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif op in (2, 3):  # an interesting integer over 4 or 8 bytes
            size = 4 if op == 2 else 8
            b[at : at + size] = (some_int(c) % (1 << (8 * size))).to_bytes(size, "little")
        elif op == 4:
            b[at:at] = c.raw(c.integer(1, 16))
        elif op == 5:
            del b[at : at + c.integer(1, 64)]
        else:
            del b[c.integer(0, len(b)) :]
    return bytes(b)


# --- seeds ---------------------------------------------------------------------------------------------
SMALL = dict(n_layers=2, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=32, tensor_type="F16", context_length=256)


def make_seeds(directory: Path) -> dict[str, list[Path]]:
    """Valid inputs of every kind, written into `directory` (small: tens of KB each)."""
    import numpy as np
    import torch

    from leank.convert.convert import convert
    from leank.convert.synthetic import TinySpec, write_tiny_model
    from leank.runtime.cache.mask import Mask, Provenance

    directory.mkdir(parents=True, exist_ok=True)
    g = directory / "gguf"
    g.mkdir(exist_ok=True)
    ggufs = [write_tiny_model(g / "llama.gguf", TinySpec(**SMALL)),
             write_tiny_model(g / "qwen2-q8.gguf", TinySpec(arch="qwen2", **{**SMALL, "tensor_type": "Q8_0"},
                                                         rope_scaling=("yarn", 4.0, 128))),
             write_tiny_model(g / "qwen3.gguf", TinySpec(arch="qwen3", **SMALL))]
    convert(ggufs[0], g / "llama-leank.gguf", "freq:0.5", align=8, k_bits=4, v_bits=2, group_size=16, sink_tokens=4,
            recent_tokens=32, force=True)
    ggufs.append(g / "llama-leank.gguf")
    spm = g / "llama-spm.gguf"  # an SPM vocabulary: byte tokens first
    parts = split_gguf(ggufs[0].read_bytes())
    tokens = _string_array(parts, "tokenizer.ggml.tokens")
    tokens[:256] = [b"<0x%02X>" % b for b in range(256)]
    _set(parts, "tokenizer.ggml.tokens", enc_record(b"tokenizer.ggml.tokens", ARR, tokens, STR))
    _set(parts, "tokenizer.ggml.model", enc_record(b"tokenizer.ggml.model", STR, b"llama"))
    _set(parts, "tokenizer.ggml.token_type", enc_record(b"tokenizer.ggml.token_type", ARR, [6] * 256 + [1] * (len(tokens) - 256), I32))
    spm.write_bytes(parts.build())
    ggufs.append(spm)

    m = directory / "masks"
    m.mkdir(exist_ok=True)
    kept = torch.zeros(2, 2, 64)
    kept[..., :16] = 1
    torch.save(kept, m / "zip.pth")
    torch.save(kept, m / "legacy.pth", _use_new_zipfile_serialization=False)
    scores = np.random.default_rng(0).random((2, 128))
    np.savetxt(m / "stage1.tsv", scores, delimiter="\t")
    Mask(kept.bool(), Provenance("freq", 0.75, 16, "seed", None, {"arch": "llama", "tokens": 5})).save(m / "mask.safetensors")
    return {"gguf": ggufs, "pth": [m / "zip.pth", m / "legacy.pth"], "tsv": [m / "stage1.tsv"],
            "safetensors": [m / "mask.safetensors"]}


def header_end(data: bytes) -> int:
    """Where a GGUF's header ends (tensor data starts), roughly: byte mutations concentrate before it."""
    try:
        from leank.runtime.gguf.reader import GGUFFile

        with tempfile.NamedTemporaryFile(suffix=".gguf") as tmp:
            tmp.write(data)
            tmp.flush()
            f = GGUFFile(tmp.name)
            end = f.data_start
            f._map.close()
            return end
    except Exception:
        return min(len(data), 4096)


# --- targets -------------------------------------------------------------------------------------------
def target_load(path: Path, workdir: Path) -> None:
    import leank
    from leank.runtime.arch.args import read_model_args
    from leank.runtime.gguf.reader import GGUFFile
    from leank.runtime.gguf.schema import policy_from_file

    f = GGUFFile(path)
    args = read_model_args(f)
    policy_from_file(f, args)
    leank.load(path, device="cpu")


def target_header(path: Path, workdir: Path) -> None:
    """The loader without the weights (CI-sized)."""
    from leank.runtime.arch.args import read_model_args
    from leank.runtime.gguf.reader import GGUFFile
    from leank.runtime.gguf.schema import policy_from_file

    f = GGUFFile(path)
    args = read_model_args(f)
    policy_from_file(f, args)


def target_inspect(path: Path, workdir: Path) -> None:
    from leank.convert.convert import inspect_file

    json.dumps(inspect_file(path), default=str)


def target_convert(path: Path, workdir: Path) -> None:
    from leank.convert.convert import convert
    from leank.runtime.gguf.schema import read_leank_metadata
    from leank.errors import LeankError
    from leank.runtime.arch.args import read_model_args
    from leank.runtime.gguf.reader import GGUFFile

    out_dir = workdir / "convert-out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    out = out_dir / "out.gguf"
    try:
        convert(path, out, "ones", k_bits=4, v_bits=4, group_size=16, sink_tokens=4, recent_tokens=32)
    except LeankError:
        left = sorted(p.name for p in out_dir.iterdir())
        if left:
            raise AssertionError(f"a failed convert left {left}")
        raise
    left = sorted(p.name for p in out_dir.iterdir())
    if left != ["out.gguf"]:
        raise AssertionError(f"convert left {left}")
    f = GGUFFile(out)  # the output is complete and carries its policy
    if read_leank_metadata(f, read_model_args(f)) is None:
        raise AssertionError("the output has no leank metadata")


def _tokenizer_child(path: Path) -> None:
    from leank.errors import LeankError
    from leank.runtime.arch.args import read_model_args
    from leank.runtime.gguf.reader import GGUFFile
    from leank.runtime.text.template import ChatTemplate
    from leank.runtime.text.tokenizer import Tokenizer

    try:
        f = GGUFFile(path)
        args = read_model_args(f)
    except LeankError as e:
        raise SystemExit(f"refused by leank: {e}")  # before llama.cpp saw it: the point
    try:
        tok = Tokenizer(path)
    except LeankError as e:
        raise SystemExit(f"refused by llama.cpp: {e}")
    bos = tok.token_text(tok.bos_id) if 0 <= tok.bos_id < args.vocab_size else ""
    eos = tok.token_text(tok.eos_id) if 0 <= tok.eos_id < args.vocab_size else ""
    for text in ("hello world", "<|im_start|>user\nhi ÿ 日本 \x00 \ufffd<|im_end|>", ""):
        for special in (False, True):
            ids = tok.tokenize(text, True, special)
            if any(not 0 <= i < args.vocab_size for i in ids):
                raise AssertionError(f"llama.cpp produced token ids outside the embedding: {ids}")
            tok.detokenize(ids)
    for i in range(args.vocab_size):  # every id the model can sample
        tok.piece(i)
        tok.piece(i, special=True)
    source = f.get("tokenizer.chat_template")
    try:
        ChatTemplate(source if isinstance(source, str) else None, bos, eos).render([{"role": "user", "content": "hi"}])
    except LeankError:
        pass


def target_tokenizer(path: Path, workdir: Path, timeout: float = 12.0) -> None:
    """Run `_tokenizer_child` in a forked child; a native crash shows as a signal."""
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # ggml would attach gdb to print one: seconds per crash
    err_file = workdir / "tokenizer-child.err"
    err_file.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: report an exception in a file, never return into the parent's code
        code = 0
        try:
            _tokenizer_child(path)
        except SystemExit as e:  # a refusal
            err_file.write_text(str(e.code))
            code = 10
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            err_file.write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            code = 3
        os._exit(code)
    deadline = time.monotonic() + timeout
    status = None
    try:
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif time.monotonic() > deadline:
                raise TimeoutError(f"llama.cpp's tokenizer ran past {timeout} s")
            else:
                time.sleep(0.005)
    finally:
        if status is None:  # timed out, or interrupted: never leave the child running
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise ChildProcessError(f"llama.cpp killed the process with signal {os.WTERMSIG(status)}")
    text = err_file.read_text() if err_file.exists() else "?"
    if os.WEXITSTATUS(status) == 10:
        from leank.errors import LeankError

        raise LeankError(text.splitlines()[0] if text else "refused")
    if os.WEXITSTATUS(status):
        raise AssertionError(f"tokenizer child failed: {text}")


def target_pth(path: Path, workdir: Path) -> None:
    from leank.masks.importers import import_leank_pth

    import_leank_pth(path, "llama")


def target_tsv(path: Path, workdir: Path) -> None:
    from leank.masks.importers import import_stage1_tsv

    import_stage1_tsv(path, 2, 64, 0.5, 16, "llama")


def target_safetensors(path: Path, workdir: Path) -> None:
    from leank.runtime.cache.mask import Mask

    Mask.load(path)


TARGETS: dict[str, tuple[str, Callable]] = {  # name: (seed kind, function)
    "header": ("gguf", target_header),
    "load": ("gguf", target_load),
    "inspect": ("gguf", target_inspect),
    "convert": ("gguf", target_convert),
    "tokenizer": ("gguf", target_tokenizer),
    "pth": ("pth", target_pth),
    "tsv": ("tsv", target_tsv),
    "safetensors": ("safetensors", target_safetensors),
}
SUFFIX = {"gguf": ".gguf", "pth": ".pth", "tsv": ".tsv", "safetensors": ".safetensors"}


def mutate_pth(data: bytes, c) -> bytes:
    """Byte mutations, or (for a torch zip) a member rewritten: pickle opcodes, sizes, compression."""
    if data[:2] != b"PK" or c.coin(0.4):
        return mutate_bytes(data, c)
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    victim = c.choice(src.namelist())
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename == victim:
                body = mutate_bytes(body, c) if c.coin(0.7) else body * c.integer(2, 4)
            zi = zipfile.ZipInfo(info.filename)
            zi.compress_type = zipfile.ZIP_DEFLATED if c.coin(0.2) else zipfile.ZIP_STORED
            z.writestr(zi, body)
    return out.getvalue()


def mutate_safetensors(data: bytes, c) -> bytes:
    """Byte mutations, or the header's JSON (the provenance JSON inside it included) rewritten."""
    if c.coin(0.4) or len(data) < 8:
        return mutate_bytes(data, c, hot_end=min(len(data), 8 + struct.unpack_from("<Q", data)[0] if len(data) >= 8 else 8))
    n = struct.unpack_from("<Q", data)[0]
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return mutate_bytes(data, c)
    meta = header.setdefault("__metadata__", {})
    what = c.integer(0, 3)
    if what == 0:
        meta["provenance"] = c.choice(['[1]', '"x"', '{"ratio": "nan"}', '{"align": 1e999}', '{"steps": "x"}',
                                       '{"ratio": NaN}', "[" * 3000, '{"align": null}', '{}', '1'])
    elif what == 1:
        meta[c.choice(["format", "version"])] = c.choice(["leank-mask", "x", ""])
    elif what == 2:
        kept = header.get("kept", {})
        kept[c.choice(["shape", "dtype", "data_offsets"])] = c.choice([[2, 2, 64], [2**40, 2, 64], "U8", "F32", [0, 10**12],
                                                                       [], [1], "BOOL"])
    else:
        header[c.choice(["kept", "other"])] = {"dtype": "U8", "shape": [2, 2, 64], "data_offsets": [0, 256]}
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + n :]


def make_input(kind: str, seed: bytes, c, gguf_parts: GGUFParts | None = None, hot: int | None = None) -> bytes:
    if kind == "gguf":
        return mutate_gguf(gguf_parts, c) if gguf_parts is not None and c.coin(0.6) else mutate_bytes(seed, c, hot)
    if kind == "pth":
        return mutate_pth(seed, c)
    if kind == "safetensors":
        return mutate_safetensors(seed, c)
    if kind == "tsv" and c.coin(0.5):  # text-level: numbers replaced by edge cases
        lines = seed.decode().splitlines()
        i = c.integer(0, len(lines) - 1)
        fields_ = lines[i].split("\t")
        j = c.integer(0, len(fields_) - 1)
        fields_[j] = c.choice(["nan", "inf", "-inf", "1e999", "0x10", "", "1,5", "\x00", "é", "1e-999", "  "])
        lines[i] = "\t".join(fields_)
        if c.coin(0.2):
            lines = lines * c.integer(2, 5)
        return "\n".join(lines).encode("utf-8")
    return mutate_bytes(seed, c)


# --- running -------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # ok | refused | finding
    detail: str = ""


class _Timeout(Exception):
    pass


def run_target(fn: Callable, path: Path, workdir: Path, timeout: float) -> Outcome:
    """Run one input. Only success and a one-line LeankError are acceptable."""
    from leank.errors import LeankError

    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        fn(path, workdir)
        return Outcome("ok")
    except LeankError as e:
        text = str(e)
        if "\n" in text or not text:
            return Outcome("finding", f"LeankError of {text.count(chr(10)) + 1} lines: {text[:300]!r}")
        return Outcome("refused", text)
    except _Timeout:
        return Outcome("finding", f"hang: more than {timeout} s")
    except BaseException as e:  # noqa: BLE001 - anything else is what we are looking for
        if isinstance(e, KeyboardInterrupt):
            raise
        return Outcome("finding", f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc()}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "leank-fuzz")
    ap.add_argument("--target", action="append", choices=list(TARGETS), help="default: all, in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds an input may take")
    ap.add_argument("--max-rss-growth-mb", type=float, default=1500.0)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()

    import warnings

    import torch

    warnings.filterwarnings("ignore")  # torch's pickle-protocol warnings for mutated .pth files
    torch.set_num_threads(1)
    os.environ.setdefault("LEANK_DEBUG", "")
    a.out.mkdir(parents=True, exist_ok=True)
    findings_dir = a.out / "findings"
    findings_dir.mkdir(exist_ok=True)
    work = a.out / "work"
    work.mkdir(exist_ok=True)
    seeds = make_seeds(a.out / "seeds")
    seed_bytes = {k: [p.read_bytes() for p in v] for k, v in seeds.items()}
    parts = [split_gguf(b) for b in seed_bytes["gguf"]]
    hots = [header_end(b) for b in seed_bytes["gguf"]]
    names = a.target or list(TARGETS)
    c = RandomChooser(random.Random(a.seed))
    stats = {n: {"inputs": 0, "ok": 0, "refused": 0, "findings": 0, "seconds": 0.0} for n in names}
    unique: dict[str, dict] = {}
    baseline = rss_mib()
    t_end = time.monotonic() + 60 * a.minutes
    i = 0
    while time.monotonic() < t_end:
        name = names[i % len(names)]
        i += 1
        kind, fn = TARGETS[name]
        k = c.integer(0, len(seed_bytes[kind]) - 1)
        data = make_input(kind, seed_bytes[kind][k], c, parts[k] if kind == "gguf" else None,
                          hots[k] if kind == "gguf" else None)
        path = work / f"input{SUFFIX[kind]}"
        path.write_bytes(data)
        t0 = time.monotonic()
        out = run_target(fn, path, work, a.timeout)
        s = stats[name]
        s["seconds"] += time.monotonic() - t0
        s["inputs"] += 1
        grew = rss_mib() - baseline
        if out.kind != "finding" and grew > a.max_rss_growth_mb:
            out = Outcome("finding", f"RSS grew by {grew:.0f} MiB")
            baseline = rss_mib()
        if out.kind == "finding":
            s["findings"] += 1
            sig = out.detail.splitlines()[0][:120]
            sig_key = f"{name}: {sig.split(':')[0]} @ {_where(out.detail)}"
            digest = hashlib.sha1(data).hexdigest()[:12]
            saved = findings_dir / f"{name}-{digest}{SUFFIX[kind]}"
            saved.write_bytes(data)
            saved.with_suffix(saved.suffix + ".txt").write_text(out.detail)
            if sig_key not in unique:
                unique[sig_key] = {"count": 0, "example": str(saved), "first": sig}
                print(f"[{i}] finding {sig_key}: {sig} -> {saved}", flush=True)
            unique[sig_key]["count"] += 1
        else:
            s[out.kind] += 1
        if i % 500 == 0:
            print(f"[{i}] " + ", ".join(f"{n} {v['inputs']}" for n, v in stats.items()), flush=True)
    summary = {"inputs": sum(v["inputs"] for v in stats.values()), "minutes": a.minutes, "seed": a.seed,
               "targets": stats, "unique_findings": unique}
    print(json.dumps(summary, indent=2))
    if a.json_out:
        a.json_out.write_text(json.dumps(summary, indent=2))


def _where(detail: str) -> str:
    """The innermost frame of a traceback as file:line, to group findings."""
    frames = [l.strip() for l in detail.splitlines() if l.strip().startswith('File "')]
    if not frames:
        return "?"
    parts = frames[-1].split(",")
    return parts[0].split("/")[-1].rstrip('"') + ":" + parts[1].strip().removeprefix("line ")


if __name__ == "__main__":
    main()
