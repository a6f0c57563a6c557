"""Rewrite a GGUF file: copy its metadata and tensors, changing only what is asked.

Streams: tensor bytes go from the input to the output in chunks with plain reads (no memory map, so
RSS stays small whatever the model's size). Atomic: the output is written to a temporary file beside the
target, flushed to disk, then renamed; any failure removes the temporary file. The input is opened
read-only and never modified.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from leank.errors import LeankError

CHUNK_BYTES = 16 << 20


@dataclass
class CopyStats:
    bytes_written: int
    seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.bytes_written / 1e6 / self.seconds if self.seconds else float("inf")


def _copy_field(writer, field) -> None:
    import gguf

    V = gguf.GGUFValueType
    main = field.types[0]
    value = field.contents()
    if main == V.ARRAY:
        sub = field.types[-1] if len(field.types) > 1 else V.UINT8
        if sub == V.ARRAY:
            raise LeankError(f"metadata key {field.name!r} holds nested arrays, which leank cannot copy")
        writer.add_key_value(field.name, value, V.ARRAY, sub)
    else:
        writer.add_key_value(field.name, value, main)


def rewrite_gguf(src, dst: str | os.PathLike[str], *, force: bool = False, drop_keys: Callable[[str], bool] = lambda k: False,
                 add_metadata: Callable[[object], None] | None = None,
                 transform: Callable[[object], tuple[np.ndarray, object] | None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> CopyStats:
    """Write `dst` from `src` (a `GGUFFile`): every metadata key except those `drop_keys` selects, then
    `add_metadata(writer)`, then every tensor, byte for byte unless `transform(tensor)` returns
    `(array, raw_dtype)` to store instead.
    """
    import gguf

    dst = Path(dst)
    if dst.exists() and not force:
        raise LeankError(f"{dst}: already exists (use --force to overwrite)")
    if dst.exists() and dst.is_dir():
        raise LeankError(f"{dst}: is a directory")
    if dst.resolve() == Path(src.path).resolve():
        raise LeankError(f"{dst}: is the input file; write to another path")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise LeankError(f"{parent}: no such directory")
    if not os.access(parent, os.W_OK):
        raise LeankError(f"{parent}: directory is not writable")
    tmp = parent / f".{dst.name}.leank-tmp-{os.getpid()}"
    t0 = time.perf_counter()
    written = 0
    writer = None
    try:
        writer = gguf.GGUFWriter(str(tmp), src.architecture)
        alignment = src.get("general.alignment")
        for name, field in src.reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture" or drop_keys(name):
                continue
            if name == "general.alignment":
                writer.add_custom_alignment(int(alignment))
                continue
            _copy_field(writer, field)
        if add_metadata is not None:
            add_metadata(writer)
        plan = []
        for t in src.reader.tensors:
            new = transform(t) if transform is not None else None
            if new is None:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=t.tensor_type)
                plan.append((t, None, int(t.n_bytes)))
            else:
                array, raw = new
                writer.add_tensor_info(t.name, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
                plan.append((t, array, array.nbytes))
        total = sum(n for _, _, n in plan)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        with open(src.path, "rb") as fin:
            for t, array, nbytes in plan:
                if array is None:
                    _stream_bytes(fin, fout, t.data_offset, nbytes)
                else:
                    array.tofile(fout)
                writer.write_padding(fout, nbytes)
                written += nbytes
                if progress:
                    progress(written, total)
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, dst)
        _fsync_dir(parent)
    except OSError as e:
        raise LeankError(f"{dst}: writing failed ({e.strerror or e}); no output was left behind") from e
    except (ValueError, TypeError, OverflowError, struct.error) as e:  # gguf-py refusing a value
        raise LeankError(f"{dst}: cannot write this file ({type(e).__name__}: {e}); no output was left behind") from e
    finally:
        if writer is not None:
            writer.close()  # idempotent; releases the descriptor when a failure came mid-write
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_float32_copy(src_path, dst_path, force: bool = True) -> Path:
    """Re-export a GGUF with every quantized or half-precision tensor dequantized to F32
    (llama.cpp then computes in float32; used to compare leank with llama.cpp exactly)."""
    import gguf

    from leank.runtime.gguf_file import GGUFFile, dequantize

    src = GGUFFile(src_path)

    def to_f32(t):
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            return None
        return dequantize(t, src.path).astype(np.float32), gguf.GGMLQuantizationType.F32

    # general.file_type describes the old quantization; drop it rather than lie
    rewrite_gguf(src, dst_path, force=force, drop_keys=lambda k: k == "general.file_type", transform=to_f32)
    return Path(dst_path)
