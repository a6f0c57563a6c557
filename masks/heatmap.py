"""A PNG picture of a mask: one row band per layer, one block per KV head, one column per channel.

Kept channels are amber, pruned ones dark, and every channel of a fully pruned head (no middle K or
V at all) dark red. The PNG is written by hand (zlib + struct): no plotting library needed.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from leank.errors import LeankError
from leank.runtime.cache.mask import Mask
from leank.runtime.outputs import write_bytes

KEPT = (250, 190, 50)
PRUNED = (35, 35, 55)
HEAD_PRUNED = (110, 20, 25)
GAP = (255, 255, 255)
MAX_PIXELS = 64 << 20


def heatmap_pixels(mask: Mask, row_px: int = 4, channel_px: int | None = None, gap_px: int = 2) -> np.ndarray:
    """(height, width, 3) uint8 RGB image of `mask` (layers top to bottom, heads left to right)."""
    L, H, D = mask.shape
    if channel_px is None:  # narrow models get wider channels so the picture stays readable
        channel_px = max(1, min(4, 512 // (H * D)))
    kept = mask.kept.numpy()
    dead = ~kept.any(-1)  # (L, H)
    cells = np.empty((L, H, D, 3), dtype=np.uint8)
    cells[:] = PRUNED
    cells[kept] = KEPT
    cells[dead] = HEAD_PRUNED
    cells = np.repeat(cells, channel_px, axis=2)  # (L, H, D*cx, 3)
    gap = np.empty((L, H, gap_px, 3), dtype=np.uint8)
    gap[:] = GAP
    rows = np.concatenate([cells, gap], axis=2).reshape(L, H * (D * channel_px + gap_px), 3)[:, :-gap_px or None]
    band = np.repeat(rows[:, None], row_px, axis=1)  # (L, row_px, W, 3)
    sep = np.empty((L, 1, band.shape[2], 3), dtype=np.uint8)
    sep[:] = GAP
    return np.concatenate([band, sep], axis=1).reshape(L * (row_px + 1), band.shape[2], 3)[:-1]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of `rgb` (height, width, 3) uint8."""
    h, w, c = rgb.shape
    if c != 3 or rgb.dtype != np.uint8 or h == 0 or w == 0:
        raise LeankError(f"png_bytes needs a non-empty (h, w, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    if h * w > MAX_PIXELS:
        raise LeankError(f"a {w}x{h} picture is too large")
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + _chunk(b"IEND", b""))


def write_heatmap(mask: Mask, path: str | Path, force: bool = True, inputs=()) -> tuple[int, int]:
    """Write `mask`'s picture to `path` (atomically, `leank.runtime.outputs`); returns (width, height)."""
    rgb = heatmap_pixels(mask)
    write_bytes(path, png_bytes(rgb), force=force, inputs=inputs, what="--png")
    return rgb.shape[1], rgb.shape[0]
