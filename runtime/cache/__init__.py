"""The KV cache: what it keeps (`mask`, `policy`), the caches themselves (`base`, `dense`, `compressed`) and
their byte accounting before anything is allocated (`plan`)."""
