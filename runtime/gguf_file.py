"""Open a GGUF file with gguf-py's memory-mapped reader and turn its tensors into torch tensors.

Everything that reads a GGUF goes through `GGUFFile`: it turns the reader's many failure modes into one
`LeankError` line, and gives typed access to metadata values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leank.errors import LeankError

# Tensor types whose dequantization we test (gguf-py can dequantize more; those are accepted too).
TESTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _gguf():
    import gguf  # imported here so that `leank --help` stays fast

    return gguf


class GGUFFile:
    """A GGUF file opened read-only (memory-mapped): metadata fields and tensors by name."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise LeankError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise LeankError(f"{self.path}: is a directory, not a GGUF file")
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise LeankError(f"{self.path}: cannot read ({e.strerror})") from e
        if magic != b"GGUF":
            raise LeankError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        gguf = _gguf()
        from leank.runtime.validate import validate_gguf

        validate_gguf(self.path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # gguf-py raises ValueError, IndexError, KeyError... on damaged files
            raise LeankError(f"{self.path}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise LeankError(f"{self.path}: truncated GGUF file (tensor {t.name!r} ends past the end of the file)")

    # --- metadata -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (str, int, float, bool or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise LeankError(f"{self.path}: metadata key {key!r} is damaged ({e})") from e

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise LeankError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def field_type(self, key: str):
        field = self.reader.fields.get(key)
        return None if field is None else field.types

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
        """Shape in torch order (rows last-dimension-first reversed, as numpy sees the data)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def load(self, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """Dequantize tensor `name` to `dtype` on `device`, in torch (row-major, GGUF dims reversed) order."""
        t = self.tensors.get(name)
        if t is None:
            raise LeankError(f"{self.path}: tensor {name!r} is missing")
        array = dequantize(t, self.path)
        if not array.flags.writeable or not array.flags.c_contiguous:  # a view of the read-only file map
            array = np.array(array, copy=True, order="C")
        out = torch.from_numpy(array).reshape(self.tensor_shape(name))
        return out.to(device=device, dtype=dtype)


def dequantize(t, path: Path) -> np.ndarray:
    """A reader tensor as float32 numpy (F32/F16 views are cheap; quantized types go through gguf-py)."""
    gguf = _gguf()
    qtype = t.tensor_type
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.asarray(t.data).astype(np.float32)
    try:
        return gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError as e:
        raise LeankError(
            f"{path}: tensor {t.name!r} has type {qtype.name}, which leank cannot dequantize; "
            f"supported: {', '.join(supported_tensor_types())}"
        ) from e


def supported_tensor_types() -> list[str]:
    """Every GGML tensor type gguf-py can dequantize (the types leank can load)."""
    gguf = _gguf()
    names = ["F32", "F16"]
    for q in gguf.GGMLQuantizationType:
        if q.name in names:
            continue
        if q in gguf.quants._type_traits:  # the registry of types with a numpy (de)quantizer
            names.append(q.name)
    return names
