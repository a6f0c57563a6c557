"""The network: weight matrices (`linear`), RoPE (`rope`), the transformer blocks and their loader (`transformer`)."""
