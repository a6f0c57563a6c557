"""Writes GGUF files: embeds masks and cache settings as `leank.*` metadata."""
