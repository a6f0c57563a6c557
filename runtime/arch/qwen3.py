"""Qwen3 (dense): per-head RMSNorm on q and k before RoPE; RoPE rotates (i, i + d/2)."""
from leank.runtime.arch.base import Architecture

ARCH = Architecture("qwen3", "Qwen3 dense (per-head q/k RMSNorm, rotate-half RoPE)", "neox")
