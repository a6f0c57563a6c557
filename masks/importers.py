"""Read masks made elsewhere: LeanK's released masks (.pth) and its stage-1 scaling factors (.tsv).

Both come from Hugging Face checkpoints, so their channels are in Hugging Face order (rotate-half RoPE:
channel i pairs with i + head_dim/2). A llama-arch GGUF stores K rows permuted for interleaved RoPE, so
they are permuted into the model's GGUF order here (`leank.runtime.rope.hf_to_gguf_permutation`);
qwen2/qwen3 GGUFs keep the Hugging Face order.

These files are untrusted input: a .pth is a pickle, loaded only with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers; sizes are capped before anything is parsed.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from leank.errors import LeankError
from leank.masks.binarize import binarize
from leank.runtime.cache.mask import Mask, Provenance
from leank.runtime.model.rope import hf_to_gguf_permutation

MAX_IMPORT_BYTES = 64 << 20  # a 128-layer, 64-KV-head, 256-dim float32 mask is 8 MiB; refuse far beyond
MAX_MASK_ELEMENTS = 1 << 24  # a tensor's claimed size can exceed its storage (zero strides): cap it too


def hf_to_gguf_order(x: torch.Tensor, arch: str) -> torch.Tensor:
    """`x` (..., head_dim) with its last dimension moved from Hugging Face order to `arch`'s GGUF order."""
    return x[..., hf_to_gguf_permutation(arch, x.shape[-1])]


def _check_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise LeankError(f"{path}: no such {what}")
    if not path.is_file():
        raise LeankError(f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_IMPORT_BYTES:
        raise LeankError(f"{path}: {size} bytes is far too large for a {what} (at most {MAX_IMPORT_BYTES})")
    return path


def _check_zip_expansion(path: Path) -> None:
    """A torch zip file's members may be deflated: cap what they expand to, before torch allocates it."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format stores tensors raw: the file size caps them
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(max(0, i.file_size) for i in z.infolist())
            deflated = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise LeankError(f"{path}: not a loadable tensor file (damaged zip: {e})") from None
    if total > MAX_IMPORT_BYTES:
        raise LeankError(f"{path}: its members expand to {total} bytes, far too large for a mask "
                         f"(at most {MAX_IMPORT_BYTES})")
    if deflated:  # torch.save never compresses; a compressed member is not a file torch wrote
        raise LeankError(f"{path}: compressed zip members ({deflated[0]}) are not accepted; torch.save writes "
                         f"them stored")


def import_leank_pth(path: str | Path, arch: str | None) -> Mask:
    """A LeanK released mask (float 0/1, (layers, kv_heads, head_dim), Hugging Face order) as a `Mask`.

    With `arch` the channels are put in that architecture's GGUF order; with None they stay in the
    file's own (Hugging Face) order, recorded as `channel_order: hf` in the provenance (for display).
    """
    path = _check_file(Path(path), "LeanK mask file")
    _check_zip_expansion(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # UnpicklingError for forbidden objects, RuntimeError/EOFError/... for damage
        raise LeankError(f"{path}: not a loadable tensor file; only plain tensors are accepted (this one is "
                         "damaged, not a torch file, or holds other Python objects)") from None
    if not isinstance(obj, torch.Tensor):
        raise LeankError(f"{path}: expected one tensor (layers, kv_heads, head_dim), found a {type(obj).__name__}")
    if obj.layout != torch.strided or obj.is_quantized:
        raise LeankError(f"{path}: expected a plain dense tensor, found a {obj.layout} one")
    if obj.dim() != 3 or 0 in obj.shape:
        raise LeankError(f"{path}: expected a 3-D tensor (layers, kv_heads, head_dim), found shape {tuple(obj.shape)}")
    if obj.numel() > MAX_MASK_ELEMENTS:
        raise LeankError(f"{path}: a mask of shape {tuple(obj.shape)} is far too large")
    if obj.is_complex() or not bool(((obj == 0) | (obj == 1)).all()):
        raise LeankError(f"{path}: mask values must all be 0 or 1")
    if obj.shape[-1] % 2:
        raise LeankError(f"{path}: head_dim {obj.shape[-1]} is odd; RoPE channels come in pairs")
    kept = obj.to(torch.bool)
    extra = {"channel_order": "hf"} if arch is None else {"arch": arch}
    if arch is not None:
        kept = hf_to_gguf_order(kept, arch)
    mask = Mask(kept)
    prov = Provenance("imported", ratio=round(1.0 - mask.kept_fraction, 6), align=mask.detected_align(),
                      source=f"leank-pth:{path.name}", extra=extra)
    return Mask(kept, prov)


def read_stage1_tsv(path: str | Path, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """LeanK stage-1 scaling factors: one line per layer, kv_heads x head_dim tab-separated numbers,
    as float32 (layers, kv_heads, head_dim) in the file's (Hugging Face) channel order."""
    path = _check_file(Path(path), "stage-1 scaling-factor file")
    width = n_kv_heads * head_dim
    try:
        text = path.read_text(encoding="ascii")
    except (UnicodeDecodeError, OSError) as e:
        raise LeankError(f"{path}: not a plain-text TSV file ({e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != width:
            raise LeankError(f"{path}: line {n} has {len(fields)} values; the model needs {n_kv_heads} KV heads x "
                             f"{head_dim} channels = {width}")
        try:
            values = np.array(fields, dtype=np.float32)  # one line at a time: memory stays 4 bytes a value
        except ValueError:
            raise LeankError(f"{path}: line {n} holds a value that is not a number") from None
        if not np.isfinite(values).all():
            raise LeankError(f"{path}: line {n} holds NaN or infinity")
        rows.append(values)
    if not rows:
        raise LeankError(f"{path}: no scaling factors found")
    return torch.from_numpy(np.stack(rows)).reshape(len(rows), n_kv_heads, head_dim)


def import_stage1_tsv(path: str | Path, n_kv_heads: int, head_dim: int, ratio: float, align: int,
                      arch: str | None) -> Mask:
    """Binarize LeanK stage-1 scaling factors (see `leank.masks.binarize`) into a `Mask` in `arch`'s GGUF
    order (the file's own order when `arch` is None)."""
    scores = read_stage1_tsv(path, n_kv_heads, head_dim)
    extra = {"channel_order": "hf"} if arch is None else {"arch": arch}
    if arch is not None:
        scores = hf_to_gguf_order(scores, arch)
    return binarize(scores, ratio, align, method="imported", source=f"leank-stage1:{Path(path).name}", **extra)
