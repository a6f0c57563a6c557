"""Llama 2/3, Mistral, SmolLM: llama.cpp's converter permutes Q/K rows so that RoPE rotates channel pairs
(2i, 2i+1); `rope_freqs` (Llama 3.1) and biases are optional."""
from leank.runtime.arch.base import Architecture

ARCH = Architecture("llama", "Llama 2/3, Mistral, SmolLM (interleaved RoPE on permuted Q/K rows)", "interleaved")
