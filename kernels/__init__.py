"""KIVI quantization and compressed-cache attention: torch references everywhere, TileLang on CUDA."""
