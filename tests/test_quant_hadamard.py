"""Hadamard matrices and the online Kronecker transform: orthogonal, flat, exact inverse-transpose."""

import math

import pytest
import torch

from pipeline.quant.hadamard import hadamard, kronecker_factors, paley, random_hadamard, walsh
from pipeline.quant.online import KroneckerTransform

EYE = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("p", [3, 7, 11, 19, 43])
def test_paley_is_hadamard(p):
    h = paley(p)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, (p + 1) * EYE(p + 1), atol=0, rtol=0)


@pytest.mark.parametrize(
    "n,factors,flat",
    [
        (64, (8, 8), True),
        (384, (16, 24), True),
        (768, (16, 48), True),
        (3072, (32, 96), True),
        (2560, (32, 80), True),
        (36, (4, 9), False),  # 36 = 4 · 9: no Paley order 4·9-1 = 35, 8·9-1 = 71 > 2^2·9 -> random 9
        # the families' widths: SmolLM2 576 = 8 · 72 (p = 71), 960 = 16 · 60 (p = 59); the tiny test models' 96, 192,
        # 320
        (576, (8, 72), True),
        (960, (16, 60), True),
        (96, (8, 12), True),
        (192, (8, 24), True),
        (320, (16, 20), True),
    ],
)
def test_orthogonal_at_any_width(n, factors, flat):
    a, b = kronecker_factors(n)
    assert (a.shape[0], b.shape[0]) == factors
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, EYE(n), atol=1e-12, rtol=0)
    is_flat = torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-12)
    assert is_flat == flat
    r = random_hadamard(n, seed=3)
    torch.testing.assert_close(r @ r.T, EYE(n), atol=1e-12, rtol=0)
    assert not torch.equal(r, random_hadamard(n, seed=4))


def test_walsh_needs_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        walsh(12)


def test_kronecker_transform_equals_dense_and_inverse_transpose_undoes_it():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    s = torch.rand(24, generator=g, dtype=torch.float64) + 0.5
    t = KroneckerTransform(a, b, s)
    x, w = torch.randn(3, 5, 24, generator=g, dtype=torch.float64), torch.randn(7, 24, generator=g, dtype=torch.float64)
    p = torch.diag(1 / s) @ torch.kron(a, b)
    torch.testing.assert_close(t(x), x @ p, atol=1e-12, rtol=0)
    torch.testing.assert_close(t.inverse_transpose(w), w @ torch.linalg.inv(p).T, atol=1e-10, rtol=0)
    # a Linear with the merged weight reads the transformed input exactly
    torch.testing.assert_close(t(x) @ t.inverse_transpose(w).T, x @ w.T, atol=1e-10, rtol=0)


def test_inverse_transpose_of_bf16_activations_inverts_in_float32():
    """Under bf16 autocast the queries reach the online transform in bf16, and linalg.inv refuses bf16:
    the factors are inverted in float32 and the result comes back in the input's dtype."""
    from pipeline.quant.formats.io import saved_dtype

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4, generator=g) + 4 * torch.eye(4), torch.randn(8, 8, generator=g) + 4 * torch.eye(8)
    t = KroneckerTransform(a, b)
    y = torch.randn(5, 32, generator=g)
    got = t.inverse_transpose(y.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), t.inverse_transpose(y), atol=0.05, rtol=0.02)
    # a trained model that carries such transforms is saved in float32, whatever the recipe's dtype
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), t)
    assert saved_dtype(model, "bfloat16") == torch.float32
    assert saved_dtype(torch.nn.Linear(32, 32), "bfloat16") == torch.bfloat16
