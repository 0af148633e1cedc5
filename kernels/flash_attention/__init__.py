"""Block-sparse flash attention: ops.flash_attention (dispatch), kernel.py (Pallas), reference.py (plain JAX)."""
