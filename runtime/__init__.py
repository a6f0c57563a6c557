"""Loads GGUF models and runs them with a KV cache (dense or compressed)."""
