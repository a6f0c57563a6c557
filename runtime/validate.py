"""Check a GGUF file's structure before gguf-py's reader trusts it.

GGUF files come from strangers. gguf-py's reader believes every count and length in the header, so a
1 KB file can make it allocate gigabytes or index out of bounds. This walks the header with bounds checks
only (no allocation proportional to a claimed size): magic, version, counts, every key/value and string
length against the bytes that remain, array element types, tensor dimensions, types and offsets.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from leank.errors import LeankError

# GGUF value types (gguf-py's GGUFValueType) and their fixed sizes; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
MAX_KEY_BYTES = 65535
MAX_DIMS = 4


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise LeankError(f"{self.path}: damaged GGUF file ({what} at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} runs past the end of the file, which is {self.size} bytes")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} runs past the end of the file, which is {self.size} bytes")
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit} allowed)")
        return self.take(n, what)

    def skip_string(self, what: str) -> None:
        self.skip(self.u64(f"{what} length"), what)


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> None:
    if vtype in _SCALAR_SIZES:
        cur.skip(_SCALAR_SIZES[vtype], f"value of {key!r}")
    elif vtype == _STRING:
        cur.skip_string(f"string value of {key!r}")
    elif vtype == _ARRAY:
        if depth > 0:
            cur.fail(f"nested array in {key!r}")
        etype = cur.u32(f"array type of {key!r}")
        count = cur.u64(f"array length of {key!r}")
        if etype in _SCALAR_SIZES:
            cur.skip(count * _SCALAR_SIZES[etype], f"array {key!r} ({count} items)")
        elif etype == _STRING:
            # every string takes at least 8 bytes: reject absurd counts before looping over them
            if count * 8 > cur.size - cur.pos:
                cur.fail(f"array {key!r} claims {count} strings, more than the file can hold")
            for i in range(count):
                cur.skip_string(f"item {i} of {key!r}")
        else:
            cur.fail(f"array {key!r} has unknown element type {etype}")
    else:
        cur.fail(f"key {key!r} has unknown value type {vtype}")


def validate_gguf(path: str | Path) -> None:
    """Raise `LeankError` unless the file's header, metadata and tensor table are self-consistent."""
    path = Path(path)
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise LeankError(f"{path}: truncated GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            if cur.take(4, "magic") != b"GGUF":
                cur.fail("bad magic")
            version = cur.u32("version")
            if version not in (2, 3):
                raise LeankError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors = cur.u64("tensor count")
            n_kv = cur.u64("metadata count")
            # each key/value needs at least 8 (key length) + 4 (type) + 1 bytes; each tensor at least 24
            if n_kv * 13 + n_tensors * 24 > size:
                cur.fail(f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the file holds")
            alignment = 32
            for _ in range(n_kv):
                key = cur.string("metadata key", limit=MAX_KEY_BYTES)
                try:
                    key_str = key.decode("utf-8")
                except UnicodeDecodeError:
                    cur.fail("metadata key is not UTF-8")
                vtype = cur.u32(f"type of {key_str!r}")
                if key_str == "general.alignment":
                    if vtype != 4:
                        cur.fail("general.alignment is not a uint32")
                    alignment = struct.unpack("<I", bytes(buf[cur.pos : cur.pos + 4]))[0] if cur.pos + 4 <= size else 0
                    if alignment == 0 or alignment & (alignment - 1):
                        cur.fail(f"general.alignment {alignment} is not a power of two")
                _skip_value(cur, vtype, key_str)
            tensors = []
            names = set()
            for i in range(n_tensors):
                name = cur.string(f"name of tensor {i}", limit=MAX_KEY_BYTES)
                if name in names:
                    cur.fail(f"duplicate tensor {name!r}")
                names.add(name)
                n_dims = cur.u32(f"dimension count of {name!r}")
                if not 1 <= n_dims <= MAX_DIMS:
                    cur.fail(f"tensor {name!r} has {n_dims} dimensions")
                dims = [cur.u64(f"dimension of {name!r}") for _ in range(n_dims)]
                raw_type = cur.u32(f"type of {name!r}")
                offset = cur.u64(f"offset of {name!r}")
                try:
                    qtype = GGMLQuantizationType(raw_type)
                    block, type_size = GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError):
                    cur.fail(f"tensor {name!r} has unknown type {raw_type}")
                n_elements = 1
                for d in dims:
                    if d == 0 or d > 2**40:
                        cur.fail(f"tensor {name!r} has dimension {d}")
                    n_elements *= d
                if dims[0] % block:
                    cur.fail(f"tensor {name!r} row of {dims[0]} is not a multiple of its {qtype.name} block ({block})")
                tensors.append((name, offset, n_elements // block * type_size))
            data_start = cur.pos + (-cur.pos) % alignment
            for name, offset, nbytes in tensors:
                if offset % alignment:
                    raise LeankError(f"{path}: damaged GGUF file (tensor {name.decode(errors='replace')!r} is misaligned)")
                if data_start + offset + nbytes > size:
                    raise LeankError(
                        f"{path}: truncated GGUF file (tensor {name.decode(errors='replace')!r} ends at byte "
                        f"{data_start + offset + nbytes}, the file has {size})"
                    )
