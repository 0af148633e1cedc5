"""Chunked gated DeltaNet: ops.delta_rule (dispatch), kernel.py (Pallas), reference.py (plain JAX)."""
