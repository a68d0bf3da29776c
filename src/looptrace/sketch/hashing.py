"""Seeded k-wise independent hash families (appendix B of the paper).

A function is drawn from the family of polynomials of degree k-1 over the prime field Z_p with
p = 2^31 - 1 (Carter-Wegman). Degree 1 gives the 2-wise independent bucket hash ``h``; degree 3 gives
the 4-wise independent sign hash ``s``. The coefficients come from a generator seeded by
blake2b(seed, parameter name, role), and the tables are computed on the CPU in int64, so the same
(seed, name, role) gives the same hash on every device and in every module order.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_P = (1 << 31) - 1  # Mersenne prime; products of two residues stay below 2^62 and fit in int64


def _coefficients(seed: int, name: str, role: str, k: int) -> list[int]:
    digest = hashlib.blake2b(f"{seed}\x1f{name}\x1f{role}".encode(), digest_size=16).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    coeffs = [int(c) for c in rng.integers(0, _P, size=k)]
    if coeffs[-1] == 0:  # keep the leading coefficient non-zero so the degree is exactly k-1
        coeffs[-1] = 1
    return coeffs


def _poly(x: torch.Tensor, coeffs: list[int]) -> torch.Tensor:
    """Horner evaluation of sum_i coeffs[i] x^i mod p for int64 ``x`` in [0, p)."""
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = (acc * x + c) % _P
    return acc


def bucket_hash(n: int, m: int, *, seed: int, name: str, role: str, independence: int = 2) -> torch.Tensor:
    """k-wise independent h: [n] -> [m] (k = ``independence``: 2 by default) as an int64 CPU tensor."""
    if n >= _P:
        raise ValueError(f"hash domain {n} exceeds 2^31 - 1")
    x = torch.arange(n, dtype=torch.int64)
    return _poly(x, _coefficients(seed, name, role, independence)) % m


def sign_hash(n: int, *, seed: int, name: str, role: str) -> torch.Tensor:
    """4-wise independent s: [n] -> {-1, +1} as an int8 CPU tensor of length n."""
    if n >= _P:
        raise ValueError(f"hash domain {n} exceeds 2^31 - 1")
    x = torch.arange(n, dtype=torch.int64)
    bit = _poly(x, _coefficients(seed, name, role, 4)) & 1
    return (1 - 2 * bit).to(torch.int8)
