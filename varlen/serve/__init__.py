"""Serving: continuous batching over a paged KV cache (request -> scheduler -> runner -> sampler -> output)."""
