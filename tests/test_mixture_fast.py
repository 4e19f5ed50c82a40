"""The eager fast path (models/mixture_fast.py) computes what the core (models/mixture_core.py) computes: the
training transform at fixed posteriors and its gradients, in float64 to 1e-10, for every option it reads."""
from __future__ import annotations

import itertools

import pytest
import torch

from models import mixture_core as core
from models import mixture_fast as fast

M, C, K = 40, 6, 3
CASES = list(itertools.product([1, C], [True, False], [True, False], [False, True], [True, False]))


@pytest.mark.parametrize("groups,affine,prior_scaling,empty,input_grad", CASES,
                         ids=[f"G{g}-affine{int(a)}-gain{int(p)}-empty{int(e)}-dx{int(d)}" for g, a, p, e, d in CASES])
def test_fast_transform_equals_the_core(groups, affine, prior_scaling, empty, input_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, C, dtype=torch.float64, generator=g) * 2 + 1
    tau = torch.softmax(3 * torch.randn(M, K, groups, dtype=torch.float64, generator=g), 1)
    if empty:  # a component with less than one sample's mass: the n_k clamp is on
        tau[:, 2] *= 1e-4
        tau /= tau.sum(1, keepdim=True)
    lam = torch.softmax(torch.randn(K, groups, dtype=torch.float64, generator=g), 0)
    shift = torch.randn(C, dtype=torch.float64, generator=g)
    w = torch.rand(C, dtype=torch.float64, generator=g) + 0.5 if affine else None
    b = torch.randn(C, dtype=torch.float64, generator=g) if affine else None
    o = core.Options(K, groups, 1e-5, 1, 4096, 10, 0.05, 1e-4, prior_scaling, True, 5, False)
    dy = torch.randn(M, C, dtype=torch.float64, generator=g)
    results = []
    for impl in (core.transform, fast.transform):
        xi = x.clone().requires_grad_(input_grad)
        wi, bi = (w.clone().requires_grad_(), b.clone().requires_grad_()) if affine else (None, None)
        y, n, E, V = impl(xi, core.features(xi - shift, groups), tau, shift, lam, wi, bi, o)
        if input_grad or affine:
            (y * dy).sum().backward()
        results.append([y, n, E, V] + [t.grad for t in (xi, wi, bi) if t is not None and t.grad is not None])
    assert (results[0][1][2].max() < 1) == empty
    assert len(results[0]) == len(results[1]) == 4 + input_grad + 2 * affine
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_layer_takes_the_fast_path_unless_told_not_to_with_the_same_gradients(monkeypatch):
    """MixtureNorm2d.fast_backward (what `bench norm` turns off for its core-autograd row): on, the layer's
    eager training step goes through fast.transform; off, through autograd of the core; the same step either way."""
    from models.mixture_norm import MixtureNorm2d
    calls, original = [], fast.transform
    monkeypatch.setattr(fast, "transform", lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1
    out = []
    for on in (True, False):
        torch.manual_seed(1)
        layer = MixtureNorm2d(4, 3, dtype=torch.float64)
        layer.fast_backward = on
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape).sin()).sum().backward()
        out.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_V))
        assert len(calls) == 1  # the first pass only
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
