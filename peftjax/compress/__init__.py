"""Compression: pruning, distillation, low-rank factorization, weight sharing."""
