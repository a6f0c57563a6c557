"""Rewrite a GGUF file: copy its metadata and tensors, changing only what is asked.

Byte-faithful: every kept metadata record and every untouched tensor is copied as raw bytes from the
input, so nothing is re-encoded (and nothing can drift). Streams: tensor bytes go from the input to the
output in chunks with plain reads, so RSS stays small whatever the model's size. Atomic: the output is
written to a temporary file beside the target, flushed to disk, then renamed; any failure removes the
temporary file. A run killed outright (SIGKILL, power loss) cannot remove it: the next write to the same
target removes the temporaries of writers that are no longer alive. The input is opened read-only and never
modified.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from leank.errors import LeankError
from leank.runtime.gguf.reader import _SCALARS, ARRAY, BOOL, STRING, GGUFFile, dequantize
from leank.runtime.outputs import TMP_MARK, atomic_write, check_output, remove_stale_temporaries, temporary_path  # noqa: F401

CHUNK_BYTES = 16 << 20


@dataclass
class CopyStats:
    bytes_written: int
    seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.bytes_written / 1e6 / self.seconds if self.seconds else float("inf")


class MetadataRecords:
    """New metadata records, encoded as GGUF key/value bytes. Offers the `add_*` methods of
    `gguf.GGUFWriter` that `leank.runtime.gguf.schema.write_leank_metadata` uses."""

    def __init__(self):
        self.records: list[tuple[str, bytes]] = []

    @staticmethod
    def _string(s: str) -> bytes:
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def _scalar(self, vtype: int, value) -> bytes:
        if vtype == STRING:
            return self._string(str(value))
        if vtype not in _SCALARS:
            raise LeankError(f"cannot encode a metadata value of type {vtype}")
        return np.array([bool(value) if vtype == BOOL else value], dtype=_SCALARS[vtype]).tobytes()

    def add_key_value(self, key: str, value, vtype, sub_type=None) -> None:
        vtype = int(vtype)
        body = struct.pack("<I", vtype)
        if vtype == ARRAY:
            sub = int(sub_type)
            body += struct.pack("<IQ", sub, len(value)) + b"".join(self._scalar(sub, v) for v in value)
        else:
            body += self._scalar(vtype, value)
        self.records = [r for r in self.records if r[0] != key] + [(key, self._string(key) + body)]

    def add_uint32(self, key: str, value: int) -> None:
        self.add_key_value(key, int(value), 4)

    def add_float32(self, key: str, value: float) -> None:
        self.add_key_value(key, float(value), 6)

    def add_string(self, key: str, value: str) -> None:
        self.add_key_value(key, value, 8)

    def add_array(self, key: str, values) -> None:
        values = list(values)
        if all(isinstance(v, str) for v in values):
            sub = 8
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            sub = 5  # int32, as gguf-py writes Python ints
        else:
            sub = 6
        self.add_key_value(key, values, 9, sub)


def _pad(n: int, alignment: int) -> int:
    return (-n) % alignment


def rewrite_gguf(src, dst: str | os.PathLike[str], *, force: bool = False,
                 drop_keys: Callable[[str], bool] = lambda k: False,
                 add_metadata: Callable[[MetadataRecords], None] | None = None,
                 transform: Callable[[object, np.ndarray], tuple[np.ndarray, object] | None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> CopyStats:
    """Write `dst` from `src` (a `GGUFFile`): every metadata record except those `drop_keys` selects,
    then the records `add_metadata(records)` adds (replacing same-named ones), then every tensor, byte for
    byte unless `transform(tensor_info, data)` returns `(array, ggml_type)` to store instead.
    """
    dst = Path(dst)
    check_output(dst, force=force, inputs=[src.path])  # before any work; atomic_write checks again

    new = MetadataRecords()
    if add_metadata is not None:
        add_metadata(new)
    added = {name for name, _ in new.records}
    kept = [f for f in src.fields.values() if not drop_keys(f.name) and f.name not in added]
    plan = []  # (tensor info, replacement array or None, ggml type, nbytes)
    for t in src.tensors.values():
        out = transform(t, src.tensor_data(t)) if transform is not None else None
        if out is None:
            plan.append((t, None, t.tensor_type, t.n_bytes))
        else:  # same logical shape, another type

            array, qtype = out
            block, type_size = GGML_QUANT_SIZES[qtype]
            if array.nbytes != t.n_elements // block * type_size:
                raise LeankError(f"{t.name}: {array.nbytes} bytes do not hold its {t.n_elements} elements as {qtype.name}")
            plan.append((t, np.ascontiguousarray(array), qtype, array.nbytes))
    alignment = src.alignment
    total = sum(n for *_, n in plan)

    t0 = time.perf_counter()
    written = 0
    try:
        with atomic_write(dst, force=force, inputs=[src.path]) as tmp, open(tmp, "wb") as fout, \
                open(src.path, "rb") as fin:
            fout.write(b"GGUF" + struct.pack("<IQQ", src.version, len(plan), len(kept) + len(new.records)))
            for f in kept:
                fout.write(src.raw_bytes(f.offset, f.nbytes))
            for _, record in new.records:
                fout.write(record)
            offset = 0
            for t, _, qtype, nbytes in plan:
                name = t.name.encode("utf-8")
                fout.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.shape)))
                fout.write(struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", int(qtype), offset))
                offset += nbytes + _pad(nbytes, alignment)
            fout.write(b"\0" * _pad(fout.tell(), alignment))
            for t, array, _, nbytes in plan:
                if array is None:
                    _stream_bytes(fin, fout, t.data_offset, nbytes)
                else:
                    array.tofile(fout)
                fout.write(b"\0" * _pad(nbytes, alignment))
                written += nbytes
                if progress:
                    progress(written, total)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        raise LeankError(f"{dst}: writing failed ({e.strerror or e}); no output was left behind") from e
    return CopyStats(written, time.perf_counter() - t0)


def _stream_bytes(fin, fout, offset: int, nbytes: int) -> None:
    fin.seek(offset)
    left = nbytes
    while left:
        chunk = fin.read(min(CHUNK_BYTES, left))
        if not chunk:
            raise LeankError("the input file ended early (truncated?)")
        fout.write(chunk)
        left -= len(chunk)


def write_float32_copy(src_path, dst_path, force: bool = True) -> Path:
    """Re-export a GGUF with every quantized or half-precision tensor dequantized to F32
    (llama.cpp then computes in float32; used to compare leank with llama.cpp exactly)."""
    src = GGUFFile(src_path)

    def to_f32(t, data):
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            return None
        return dequantize(data, t.tensor_type, t.name, src.path).astype(np.float32), gguf.GGMLQuantizationType.F32

    # general.file_type describes the old quantization; drop it rather than lie
    rewrite_gguf(src, dst_path, force=force, drop_keys=lambda k: k == "general.file_type", transform=to_f32)
    return Path(dst_path)
