"""Chunked scalar-gated linear attention / SSD: ops.linear_attention (dispatch), kernel.py (Pallas), reference.py (plain JAX)."""
