"""Orthogonal matrices for rotations (QuaRot, Ashkboos et al. 2024): Hadamard matrices of any width
that has one, and a documented stand-in where none is known to us.

A width n = 2^k · m (m odd) gets:
- m = 1: the Walsh-Hadamard (Sylvester) matrix W_n;
- otherwise, when some Paley order p + 1 = 2^j · m exists (p a prime ≡ 3 mod 4, 2 <= j <= k): W_{2^(k-j)} ⊗ P_{p+1},
  a true Hadamard matrix (Qwen3-0.6B's intermediate 3072 = 256 · 12 with P_12 from p = 11; 2560 = 128 · 20
  from p = 19); QuaRot ships such matrices as constant tables, we build them (Paley's construction I);
- otherwise W_{2^k} ⊗ R_m with R_m a seeded random orthogonal matrix (QR of a Gaussian): orthogonal,
  so every exactness argument still holds, but R_m's entries are not flat, so outliers are spread over
  the 2^k-blocks evenly and only roughly within them.
Matrices are normalised to be orthogonal (entries ±1/sqrt(n)) and returned in float64.

Every matrix comes as two Kronecker factors (`kronecker_factors`), as balanced as the width allows, so an
online transform costs n·(n1 + n2) multiply-adds per token instead of n² (x (A ⊗ B) = vec(Aᵀ X B)).
"""

from __future__ import annotations

import math

import torch


def walsh(n: int) -> torch.Tensor:
    """Sylvester's ±1 Hadamard matrix of order n (a power of 2), float64, unnormalised."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Walsh-Hadamard order must be a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley(p: int) -> torch.Tensor:
    """Paley's construction I: a ±1 Hadamard matrix of order p + 1 from a prime p ≡ 3 (mod 4), float64.

    Q[i, j] = χ(j - i) (the quadratic character mod p) is antisymmetric when p ≡ 3 mod 4; with the bordered
    S = [[0, 1ᵀ], [-1, Q]], H = I + S satisfies H Hᵀ = (p + 1) I.
    """
    if not _is_prime(p) or p % 4 != 3:
        raise ValueError(f"Paley I needs a prime p ≡ 3 mod 4, got {p}")
    squares = {(x * x) % p for x in range(1, p)}
    chi = torch.tensor([0.0] + [1.0 if d in squares else -1.0 for d in range(1, p)], dtype=torch.float64)
    idx = torch.arange(p)
    q = chi[(idx[None, :] - idx[:, None]) % p]
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, q
    return torch.eye(p + 1, dtype=torch.float64) + s


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _odd_block(n: int, seed: int) -> tuple[int, torch.Tensor]:
    """(2^a, B): n = 2^a · size(B) with B an orthonormal Paley block, a random orthogonal one (no Paley order
    fits), or [[1]] (n a power of 2)."""
    k = (n & -n).bit_length() - 1
    m = n >> k
    if m == 1:
        return n, torch.ones(1, 1, dtype=torch.float64)
    for j in range(2, k + 1):
        if _is_prime((m << j) - 1) and ((m << j) - 1) % 4 == 3:
            return 1 << (k - j), paley((m << j) - 1) / math.sqrt(m << j)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return 1 << k, (q * torch.sign(torch.diagonal(r))).contiguous()  # sign fix: the Haar-distributed Q


def kronecker_factors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal (A [n1, n1], B [n2, n2]), n1·n2 = n, n1 the power of 2 nearest below sqrt(n) that the
    construction allows, with A ⊗ B = hadamard(n, seed)."""
    power, block = _odd_block(n, seed)
    n1 = 1
    while n1 * 2 <= power and (n1 * 2) ** 2 <= n:
        n1 *= 2
    a = walsh(n1) / math.sqrt(n1)
    b = torch.kron(walsh(power // n1) / math.sqrt(power // n1), block)
    return a, b


def hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """The orthogonal n × n matrix of the module docstring, float64."""
    a, b = kronecker_factors(n, seed)
    return torch.kron(a, b)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """QuaRot's randomised Hadamard: diag(±1) · hadamard(n), the signs drawn from `seed`, float64.
    Random signs make the rotation a different one per seed while keeping it flat."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n, seed)
