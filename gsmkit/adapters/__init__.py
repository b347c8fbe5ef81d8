"""Adapter folders in, adapter artifacts out: merging (+ verification), SVD audit, compression."""
