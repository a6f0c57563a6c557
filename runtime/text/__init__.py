"""Text in and out: llama.cpp's tokenizer (`tokenizer`) and the sandboxed chat template (`template`)."""
