"""Qwen2 / Qwen2.5: q/k/v biases; Hugging Face channel order kept, RoPE rotates (i, i + d/2)."""
from leank.runtime.arch.base import Architecture

ARCH = Architecture("qwen2", "Qwen2/Qwen2.5 (q/k/v biases, rotate-half RoPE)", "neox")
