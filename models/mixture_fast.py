"""MN's eager fast path: the training transform at fixed posteriors (detach_posteriors, the default) with a
hand-written backward. The same maths as models/mixture_core.py's `transform` (tests/test_mixture_fast.py holds
the two equal in float64); what it buys, against autograd through the core, is in `bench norm`.

With tau constant the transform is a tau-weighted sum of K BatchNorm-like maps, and its gradient is again a
product of tau with K x C coefficients. Autograd through the core keeps the samples' features and the
intermediate products for backward, and dispatches each of the statistics' small ops again in reverse; this
keeps x and tau (about what BatchNorm keeps). Its products add into the output (in backward, the input gradient)
in place instead of writing new (M, C) tensors to sum: at CPU sizes, writing one costs more than the product
that fills it.

The backward, with tauhat_ik = tau_ik / n_k, xc = x - shift, and the clamp n_k = max(n_true_k, 1):
    dx_i = sum_k tau_ik [P_k dy_i - b_k x_i + alpha_k]
    b_k = P_k h_k / (n_k (V_k + eps)),  alpha_k = b_k (shift + (2 - n_true_k / n_k) Ec_k) - P_k g_k / n_k
from the sums g_k = sum_i tau_ik dy_i and h_k = sum_i tau_ik dy_i (x_i - E_k): the first term through the mean
in P_k x + Q_k, the other two through E_k and V_k. Like SyncBatchNorm, gamma's and beta's gradients stay local
(data parallelism averages them) and the sums behind the input gradient are global.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models import mixture_core as core


class Transform(torch.autograd.Function):
    """core.transform's (y, n, E, V) with the backward above; n, E and V are not differentiable."""

    @staticmethod
    def forward(ctx, x, f, tau, shift, lam, weight, bias, o: core.Options, sums):
        n, E, V = core.statistics(sums(core.moments(tau, f)), shift)
        P, Q = core.coefficients(lam, E, V, weight, bias, o)
        gain = core.spread(core.gain(lam, o), x.shape[1])  # not lam itself: the layer's buffer, rewritten in place
        ctx.save_for_backward(x, tau, shift, gain, n, E, V, P)
        ctx.o, ctx.sums = o, sums
        ctx.mark_non_differentiable(n, E, V)
        ctx.set_materialize_grads(False)
        return mix(x, tau, P, Q), n, E, V

    @staticmethod
    def backward(ctx, dy, _dn, _dE, _dV):
        if dy is None:
            return (None,) * 9
        x, tau, shift, gain, n_true, E, V, P = ctx.saved_tensors
        C = x.shape[1]
        g, m = (weigh(tau, t) for t in (dy, dy * x))  # m: sum_i tau_ik dy_i x_i; h_k from it (E in input units)
        h = m - E * g
        d_weight = (gain * (V + ctx.o.eps).rsqrt() * h).sum(0) if ctx.needs_input_grad[5] else None
        d_bias = g.sum(0) if ctx.needs_input_grad[6] else None
        d_x = None
        if ctx.needs_input_grad[0]:
            g, h = ctx.sums(torch.cat([g, h], 1)).chunk(2, 1)
            n = n_true.clamp_min(1.0)
            Pn = P / core.spread(n, C)
            b = Pn * h / (V + ctx.o.eps)
            alpha = b * (shift + core.spread(2.0 - n_true / n, C) * (E - shift)) - Pn * g
            d_x = expand(tau, alpha, expand(tau, P).mul_(dy).addcmul_(x, expand(tau, b), value=-1.0))
        return d_x, None, None, None, None, d_weight, d_bias, None, None


def weigh(tau: Tensor, t: Tensor) -> Tensor:
    """sum_i tau_ik t_i (K, C) for rows t (M, C): core.moments of t's channels as the features."""
    return core.moments(tau, core.grouped(t, tau.shape[2])).flatten(1)


def expand(tau: Tensor, W: Tensor, out: Tensor | None = None) -> Tensor:
    """sum_k tau_ik W_k (M, C) for W (K, C): a new tensor, or added into `out` (M, C). Joint posteriors: one
    (M, K) @ (K, C) product, which adds into `out` itself; per channel (tau (M, K, C)), a sum over k."""
    if tau.shape[2] == 1:
        t = tau[:, :, 0]
        return torch.mm(t, W) if out is None else out.addmm_(t, W)
    y = (tau * W).sum(1)
    return y if out is None else out.add_(y)


def mix(x: Tensor, tau: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """core.mix in one (M, C) tensor: A, times x in place, then B added into it (core.mix writes three (M, C)
    tensors besides y)."""
    return expand(tau, Q, expand(tau, P).mul_(x))


def transform(x: Tensor, f: Tensor, tau: Tensor, shift: Tensor, lam: Tensor, weight, bias, o: core.Options,
              sums: core.Sums = core.identity):
    """core.transform by this module's forward and backward (tau must be constant: detach_posteriors)."""
    return Transform.apply(x, f, tau, shift, lam, weight, bias, o, sums)
