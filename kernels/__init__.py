"""Triton kernels, one op per file; installed as `lpreg.kernels` (imported lazily)."""
