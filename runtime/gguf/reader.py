"""Read GGUF files: a bounds-checked parse of the header, lazy metadata, memory-mapped tensors.

GGUF files come from strangers, so nothing in the header is believed before it is checked: counts and
lengths against the bytes that remain (a 1 KB file cannot make us allocate gigabytes), value and tensor
types against the known ones, tensor shapes, offsets and sizes against the file. Every failure is one
`LeankError` line.

The parse records where each metadata value lies and decodes it only when asked (the vocabulary's tens
of thousands of strings are never decoded unless someone reads them), so opening a file takes a
fraction of a second. Names of types and the dequantizers come from gguf-py (`gguf.constants`,
`gguf.quants`), which stays the reference for the format.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.constants import GGUFValueType as V

from leank.errors import LeankError

# Tensor types whose dequantization the tests cover (every type gguf-py dequantizes loads).
TESTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF value types (gguf-py's numbering): the numpy dtype of each fixed-size one
_SCALARS = {V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
            V.FLOAT32: "<f4", V.BOOL: "<u1", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8"}
STRING, ARRAY, BOOL, UINT32 = V.STRING, V.ARRAY, V.BOOL, V.UINT32
MAX_NAME_BYTES = 65535
MAX_TENSOR_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME is 64 with the terminating NUL
MAX_DIMS = 4
MAX_DIM = 1 << 40
# A string array is walked item by item; 4M items (a vocabulary is ~50-260K) bounds the walk to seconds.
MAX_STRING_ARRAY_ITEMS = 1 << 22
VERSIONS = (2, 3)
# Keys whose type is checked when the file is opened: leank (or llama.cpp) reads them from every file, so a
# crafted one (an array of millions of items where a name belongs) is refused before anyone decodes it.
KEY_TYPES = {"general.architecture": [STRING], "general.name": [STRING], "general.alignment": [UINT32],
             "tokenizer.chat_template": [STRING], "tokenizer.ggml.model": [STRING]}


@dataclass(frozen=True)
class Field:
    """One metadata key: where its record lies in the file and how to decode its value."""

    name: str
    type: int  # gguf.GGUFValueType
    sub_type: int | None  # element type of an array
    offset: int  # start of the whole record (key length, key, type, value)
    nbytes: int  # size of the whole record
    value_offset: int
    count: int  # elements of an array (1 otherwise)

    @property
    def types(self) -> list[int]:
        return [self.type] if self.sub_type is None else [self.type, self.sub_type]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    n_elements: int
    n_bytes: int
    info_offset: int  # the tensor's entry in the tensor table
    info_nbytes: int
    data_offset: int  # absolute offset of its data

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


class _Parser:
    """Walks the header with a cursor, refusing anything that does not fit the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise LeankError(f"{self.path}: damaged GGUF file ({what} at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise LeankError(f"{self.path}: truncated GGUF file ({what} runs past the end, {self.size} bytes)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        v = struct.unpack_from("<I", self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        v = struct.unpack_from("<Q", self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit} allowed)")
        self.need(n, what)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip_value(self, vtype: int, key: str) -> tuple[int | None, int]:
        """Skip a value of `vtype`; returns (array element type, element count)."""
        if vtype in _SCALARS:
            self.need(np.dtype(_SCALARS[vtype]).itemsize, f"value of {key!r}")
            self.pos += np.dtype(_SCALARS[vtype]).itemsize
            return None, 1
        if vtype == STRING:
            n = self.u64(f"string length of {key!r}")
            self.need(n, f"string value of {key!r}")
            self.pos += n
            return None, 1
        if vtype == ARRAY:
            etype = self.u32(f"array type of {key!r}")
            count = self.u64(f"array length of {key!r}")
            if etype in _SCALARS:
                size = np.dtype(_SCALARS[etype]).itemsize
                if count > (self.size - self.pos) // size:
                    raise LeankError(f"{self.path}: truncated GGUF file (array {key!r} claims {count} items, "
                                     "more than the file holds)")
                self.pos += count * size
            elif etype == STRING:
                if count > (self.size - self.pos) // 8:  # each string takes 8 bytes at least
                    raise LeankError(f"{self.path}: truncated GGUF file (array {key!r} claims {count} strings, "
                                     "more than the file holds)")
                if count > MAX_STRING_ARRAY_ITEMS:
                    self.fail(f"array {key!r} holds {count} strings (at most {MAX_STRING_ARRAY_ITEMS} allowed)")
                for i in range(count):
                    n = self.u64(f"length of item {i} of {key!r}")
                    self.need(n, f"item {i} of {key!r}")
                    self.pos += n
            elif etype == ARRAY:
                self.fail(f"nested array in {key!r}")
            else:
                self.fail(f"array {key!r} has unknown element type {etype}")
            return etype, count
        self.fail(f"key {key!r} has unknown value type {vtype}")


class GGUFFile:
    """A GGUF file opened read-only: metadata fields and tensors by name (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise LeankError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise LeankError(f"{self.path}: is a directory, not a GGUF file")
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO would block open(), a device never ends
                raise LeankError(f"{self.path}: not a regular file")
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 4 or fh.read(4) != b"GGUF":
                    fh.seek(0)
                    raise LeankError(f"{self.path}: not a GGUF file (its first four bytes are not \"GGUF\")")
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise LeankError(f"{self.path}: cannot read ({e.strerror})") from e
        self.size = size
        self._array: np.ndarray | None = None
        self._parse()

    def _parse(self) -> None:
        p = _Parser(self._map, self.path)
        p.pos = 4
        version = p.u32("version")
        if version not in VERSIONS:
            if version & 0xFFFF == 0:
                raise LeankError(f"{self.path}: big-endian GGUF files are not supported")
            raise LeankError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        n_tensors = p.u64("tensor count")
        n_kv = p.u64("metadata count")
        if n_kv * 13 + n_tensors * 24 > self.size:  # smallest possible records
            raise LeankError(f"{self.path}: truncated GGUF file (the header claims {n_kv} metadata keys and "
                             f"{n_tensors} tensors, more than {self.size} bytes hold)")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            start = p.pos
            raw = p.string("metadata key", MAX_NAME_BYTES)
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                p.fail("a metadata key is not UTF-8")
            if not name:
                p.fail("an empty metadata key")  # llama.cpp refuses them too
            if name in self.fields:
                p.fail(f"duplicate metadata key {name!r}")
            vtype = p.u32(f"type of {name!r}")
            value_at = p.pos
            sub, count = p.skip_value(vtype, name)
            self.fields[name] = Field(name, vtype, sub, start, p.pos - start, value_at, count)
        for key, types in KEY_TYPES.items():
            field = self.fields.get(key)
            if field is not None and field.types != types:
                raise LeankError(f"{self.path}: damaged GGUF file ({key} is not a "
                                 f"{'string' if types == [STRING] else 'uint32'})")
        alignment = self.get("general.alignment", 32)
        if alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise LeankError(f"{self.path}: damaged GGUF file (general.alignment {alignment!r} is not a power of two)")
        self.alignment = alignment
        pending = []
        for i in range(n_tensors):
            start = p.pos
            raw = p.string(f"name of tensor {i}", MAX_NAME_BYTES)
            if len(raw) > MAX_TENSOR_NAME_BYTES or b"\0" in raw:
                p.fail(f"tensor {i} has a name of {len(raw)} bytes (llama.cpp allows {MAX_TENSOR_NAME_BYTES}, no NUL)")
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                p.fail(f"the name of tensor {i} is not UTF-8")
            n_dims = p.u32(f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                p.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(p.u64(f"dimension of {name!r}") for _ in range(n_dims))
            raw_type = p.u32(f"type of {name!r}")
            offset = p.u64(f"offset of {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                p.fail(f"tensor {name!r} has unknown type {raw_type}")
            n = 1
            for d in dims:
                if not 0 < d <= MAX_DIM:
                    p.fail(f"tensor {name!r} has dimension {d}")
                n *= d
            if n > MAX_DIM or dims[0] % block:
                p.fail(f"tensor {name!r} of shape {list(dims)} does not fit its type {qtype.name}")
            pending.append((name, qtype, dims, n, n // block * type_size, start, p.pos - start, offset))
        self.data_start = p.pos + (-p.pos) % self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        expected = 0  # tensors lie one after the other, each padded to the alignment (llama.cpp's rule too)
        for name, qtype, dims, n, nbytes, start, info_nbytes, offset in pending:
            if name in self.tensors:
                raise LeankError(f"{self.path}: damaged GGUF file (duplicate tensor {name!r})")
            if offset != expected:
                raise LeankError(f"{self.path}: damaged GGUF file (tensor {name!r} starts at data offset {offset}, "
                                 f"expected {expected}: tensors must follow one another)")
            expected += nbytes + (-nbytes) % self.alignment
            at = self.data_start + offset
            if at + nbytes > self.size:
                raise LeankError(f"{self.path}: truncated GGUF file (tensor {name!r} ends at byte {at + nbytes}, "
                                 f"the file has {self.size})")
            self.tensors[name] = TensorInfo(name, qtype, dims, n, nbytes, start, info_nbytes, at)

    # --- metadata -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.fields)

    def raw_bytes(self, start: int, nbytes: int) -> bytes:
        return bytes(self._map[start : start + nbytes])

    def get(self, key: str, default: Any = None, max_items: int | None = None) -> Any:
        """The value of a metadata key (str, int, float, bool or list), or `default` when absent.

        `max_items` refuses (LeankError) an array longer than that before decoding it: a key that should
        hold a few numbers may hold millions in a crafted file, and a Python list of them is ~30x its bytes."""
        f = self.fields.get(key)
        if f is None:
            return default
        if max_items is not None and f.type == ARRAY and f.count > max_items:
            raise LeankError(f"{self.path}: metadata key {key!r} holds {f.count} items, at most {max_items} expected")
        return self._decode(f)

    def _decode(self, f: Field) -> Any:
        m = self._map
        if f.type in _SCALARS:
            v = np.frombuffer(m, dtype=_SCALARS[f.type], count=1, offset=f.value_offset)[0]
            return bool(v) if f.type == BOOL else v.item()
        if f.type == STRING:
            n = struct.unpack_from("<Q", m, f.value_offset)[0]
            return bytes(m[f.value_offset + 8 : f.value_offset + 8 + n]).decode("utf-8", errors="replace")
        at = f.value_offset + 12  # element type (u32) and count (u64)
        if f.sub_type in _SCALARS:
            values = np.frombuffer(m, dtype=_SCALARS[f.sub_type], count=f.count, offset=at)
            return [bool(v) for v in values] if f.sub_type == BOOL else values.tolist()
        out = []
        for _ in range(f.count):
            n = struct.unpack_from("<Q", m, at)[0]
            out.append(bytes(m[at + 8 : at + 8 + n]).decode("utf-8", errors="replace"))
            at += 8 + n
        return out

    def raw_strings(self, key: str) -> list[bytes] | None:
        """The items of a string array as raw bytes (not decoded), or None when absent or not one."""
        f = self.fields.get(key)
        if f is None or f.types != [ARRAY, STRING]:
            return None
        m, at, out = self._map, f.value_offset + 12, []
        unpack = struct.unpack_from
        for _ in range(f.count):
            n = unpack("<Q", m, at)[0]
            out.append(m[at + 8 : at + 8 + n])
            at += 8 + n
        return out

    def array(self, key: str) -> np.ndarray | None:
        """A numeric array value as numpy (no Python list), or None when absent or not numeric."""
        f = self.fields.get(key)
        if f is None or f.type != ARRAY or f.sub_type not in _SCALARS:
            return None
        return np.frombuffer(self._map, dtype=_SCALARS[f.sub_type], count=f.count, offset=f.value_offset + 12)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise LeankError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def field_type(self, key: str):
        f = self.fields.get(key)
        return None if f is None else f.types

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise LeankError(f"{self.path}: no general.architecture key; not a model GGUF")
        return arch

    # --- tensors --------------------------------------------------------------------------------
    def has_tensor(self, name: str) -> bool:
        return name in self.tensors

    def tensor_type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in torch order (GGUF dims reversed: rows first)."""
        return self.tensors[name].numpy_shape

    def release_pages(self, names: list[str] | None = None) -> None:
        """Let the kernel drop this process's resident pages of the file (all of it, or tensors `names`):
        they stay in the page cache and come back on the next read. After a tensor was copied (dequantized,
        repacked) its pages no longer count in the process's memory; what is still read from the map
        comes back as it is read. An advice: never an error."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        ranges = [(0, self.size)] if names is None else [
            (self.tensors[n].data_offset, self.tensors[n].n_bytes) for n in names if n in self.tensors]
        page = mmap.PAGESIZE
        for start, length in ranges:
            lo, hi = start // page * page, min(self.size, start + length)
            if hi > lo:
                try:
                    self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                except (OSError, ValueError):
                    pass

    def tensor_data(self, t: TensorInfo) -> np.ndarray:
        """The stored data, read-only: float arrays for float types, rows of block bytes for the rest
        (the layout gguf-py's dequantizers take)."""
        if self._array is None:
            self._array = np.frombuffer(self._map, dtype=np.uint8)
        raw = self._array[t.data_offset : t.data_offset + t.n_bytes]
        Q = GGMLQuantizationType
        plain = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                 Q.I32: np.int32, Q.I64: np.int64}
        if t.tensor_type in plain:
            return raw.view(plain[t.tensor_type]).reshape(t.numpy_shape)
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        rows = t.numpy_shape[:-1]
        return raw.reshape(*rows, t.shape[0] // block * type_size)

    def load(self, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """Dequantize tensor `name` to `dtype` on `device`, in torch (rows first) order."""
        t = self.tensors.get(name)
        if t is None:
            raise LeankError(f"{self.path}: tensor {name!r} is missing")
        array = dequantize(self.tensor_data(t), t.tensor_type, name, self.path)
        if not array.flags.writeable or not array.flags.c_contiguous:  # a view of the read-only map
            array = np.array(array, copy=True, order="C")
        return torch.from_numpy(array).reshape(t.numpy_shape).to(device=device, dtype=dtype)


def dequantize(data: np.ndarray, qtype, name: str, path: Path) -> np.ndarray:
    """Stored data as float32 numpy (F32/F16 directly; quantized types through gguf-py)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float32)
    try:
        return gguf.quants.dequantize(data, qtype)
    except NotImplementedError as e:
        raise LeankError(f"{path}: tensor {name!r} has type {qtype.name}, which leank cannot dequantize; "
                         f"supported: {', '.join(supported_tensor_types())}") from e


def supported_tensor_types() -> list[str]:
    """Every GGML tensor type gguf-py can dequantize (the types leank can load)."""
    names = ["F32", "F16"]
    for q in gguf.GGMLQuantizationType:
        if q.name not in names and q in gguf.quants._type_traits:  # gguf-py's registry of numpy dequantizers
            names.append(q.name)
    return names
