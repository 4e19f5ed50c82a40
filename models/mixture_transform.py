"""The Mixture Normalization transform and its autograd functions, for posteriors already computed
(models/gmm.py, models/gmm_per_channel.py). Notation as there; for the joint mixture:

    n_k                 sum_i tau_ik;  tauhat_ik = tau_ik / n_k
    E_k, V_k            (K, C): E_k = sum_i tauhat_ik x_i, V_k = sum_i tauhat_ik (x_i - E_k)^2
    s_k                 1/sqrt(max(lambda_k, lambda_min)) (prior_scaling) or 1
    r_k                 1/sqrt(V_k + eps)

    y_i = gamma * sum_k tau_ik s_k r_k (x_i - E_k) + beta
        = x_i * A_i + B_i,  A_i = sum_k tau_ik P_k,  B_i = sum_k tau_ik Q_k,
          P_k = gamma s_k r_k,  Q_k = beta - P_k E_k          (uses sum_k tau_ik = 1)

A and B are (C, K) @ (K, L) GEMMs, so the transform is a K-weighted sum of BN-like ops
that never builds an N x K x C x L tensor; with tau constant (the default) its backward
is again a few such GEMMs (MixtureNormFunction).

Per-channel posteriors (second half of this file) replace tau_ik by tau_ikc, so every per-component
quantity becomes per (component, channel):

    n_kc  = sum_i tau_ikc,   E_kc = sum_i tau_ikc x_ic / n_kc,
    V_kc  = sum_i tau_ikc (x_ic - E_kc)^2 / n_kc
    s_kc  = 1/sqrt(max(lambda_kc, lambda_min)) (prior_scaling) or 1,   r_kc = 1/sqrt(V_kc + eps)
    y_ic  = gamma_c sum_k tau_ikc s_kc r_kc (x_ic - E_kc) + beta_c
          = sum_k tau_ikc (P_kc x_ic + Q_kc),  P = gamma s r,  Q = beta - P E

and the spec's guards carry over per (k, c): n_kc clamped at 1, lambda_kc floored in s_kc. K = 1
gives BatchNorm either way.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from models import gmm_per_channel as pc
from models.gmm import Reduce, identity, moments, reduce_moments


# ----------------------------------------------------------------------------------------
# Sample layouts
# ----------------------------------------------------------------------------------------


def is_sample_major(t: Tensor) -> bool:
    """True when t's samples are best seen as rows of an (M, C) matrix: (N, C) input,
    one position per item, or a channels-last 4-D tensor (the trainer's default)."""
    if t.dim() == 2 or t.numel() == t.shape[0] * t.shape[1]:
        return True
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def viewable(t: Tensor) -> Tensor:
    """t, or a contiguous copy if its layout is one as_ncl would have to copy (rare):
    the training path writes its output through an as_ncl view."""
    sm = is_sample_major(t)
    return t if (t.movedim(1, -1) if sm else t).is_contiguous() else t.contiguous()


def as_ncl(t: Tensor, sample_major: bool) -> Tensor:
    """(N, C, *) as (B, C, L): (N, C, L) for contiguous t; for sample-major t, (1, C, M), the
    transpose of the (M, C) sample matrix, so that every sum over samples is one plain GEMM.
    A view whenever t's layout is the one sample_major says (it copies otherwise)."""
    if sample_major:
        return t.movedim(1, -1).reshape(-1, t.shape[1]).t().unsqueeze(0)
    return t.reshape(t.shape[0], t.shape[1], -1)


def from_ncl(t3: Tensor, shape: torch.Size, sample_major: bool) -> Tensor:
    """Inverse of as_ncl."""
    if sample_major:
        return t3[0].t().reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return t3.reshape(shape)


# ----------------------------------------------------------------------------------------
# Joint posteriors
# ----------------------------------------------------------------------------------------


def _contract_into(out: Tensor, W: Tensor, tau: Tensor, accumulate: bool = False) -> Tensor:
    """out[b, c, l] (+)= sum_k W[k, c] tau[b, k, l], as a GEMM in whichever orientation
    matches out's memory (channel-major or sample-major)."""
    B, C, K = out.shape[0], out.shape[1], tau.shape[1]
    if out.stride(2) == 1 or out.stride(1) != 1:
        W = W.t().expand(B, C, K)
        return out.baddbmm_(W, tau) if accumulate else torch.bmm(W, tau, out=out)
    out_t, tau_t, W = out.transpose(1, 2), tau.transpose(1, 2), W.expand(B, K, C)
    if accumulate:
        out_t.baddbmm_(tau_t, W)
    else:
        torch.bmm(tau_t, W, out=out_t)
    return out


def mix_apply(X: Tensor, tau: Tensor, P: Tensor, Q: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y_i = x_i * sum_k tau_ik P_k + sum_k tau_ik Q_k for X (B, C, L), tau (B, K, L).

    With `out` (no autograd), y is written there: on CPU a fresh activation-sized tensor
    costs about as much as a pass over it (page faults), so the training path reuses one.
    """
    if out is None:
        return torch.addcmul(torch.matmul(Q.t(), tau), X, torch.matmul(P.t(), tau))
    _contract_into(out, P, tau).mul_(X)
    return _contract_into(out, Q, tau, accumulate=True)


def normalize_math(X, X2c, shift, tau, scale, weight, bias, eps: float, reduce: Reduce,
                   out: Optional[Tensor] = None):
    """Spec's training-mode transform; differentiable by autograd when tau/X require grad.

    X2c = (X - shift)^2. Returns y (written to `out` if given, which may be X2c itself) and
    E_k (centered), V_k, n_true = sum_i tau_ik, the clamped n_k, r_k.
    """
    n_true, s1, s2 = reduce_moments(*moments(tau, X, X2c, shift), reduce)
    # A component can hold almost no sample of a batch (nearly hard posteriors in wide
    # layers): clamping n_k keeps E_k, V_k finite instead of 0/0 (E_k then shrinks toward
    # the shift, i.e. the mixture's mean).
    n = n_true.clamp_min(1.0)
    E = s1 / n[:, None]
    # = sum_i tau_ik (xc_i - E_k)^2 / n_k; the n_true/n factor differs from 1 only when
    # the clamp is active.
    V = ((s2 - 2.0 * E * s1) / n[:, None] + (n_true / n)[:, None] * E * E).clamp_min(0.0)
    r = torch.rsqrt(V + eps)
    P, Q = coefficients(scale, r, E + shift, weight, bias)  # E + shift: X is not centered
    return mix_apply(X, tau, P, Q, out), E, V, n_true, n, r


def coefficients(scale: Tensor, r: Tensor, center: Tensor, weight: Tensor | None, bias: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
    """y = sum_k tau_k (P_k x + Q_k): P = scale_k r_k gamma, Q = beta - P center_k. One builder for the training
    and the running transform, so that the two stay the same maths; and for both kinds of posteriors:
    scale is (K,) for joint ones, (K, C) for per-channel ones (r, center, P and Q are (K, C) either way)."""
    P = (scale[:, None] if scale.dim() == 1 else scale) * r
    if weight is not None:
        P = P * weight
    Q = -P * center
    if bias is not None:
        Q = Q + bias
    return P, Q


class MixtureNormFunction(torch.autograd.Function):
    """Training transform with constant posteriors (detach_posteriors=True).

    X is (N, C, *), X2c = (X - shift)^2 its as_ncl view. If `out` (X's shape and layout)
    holds X2c's storage, the output overwrites X2c there and `out` is returned: the step
    then allocates one activation-sized tensor, like BN. Either way the output is not an
    autograd view (an in-place ReLU on a view would make autograd copy gradients around).

    Hand-written backward: with tau constant the transform is a tau-weighted sum of K
    BN-like ops, and its gradient is again a few (C, K) @ (K, L) matmuls. Saves only X and
    tau (N, K, L) for backward, about what BN keeps.
    """

    @staticmethod
    def forward(ctx, X, X2c, out, shift, tau, scale, weight, bias, eps, reduce):
        sm = is_sample_major(X)
        if out is None:  # under torch.compile, which manages memory itself
            out = torch.empty_like(X)
            buf = as_ncl(out, sm)
        else:
            buf = X2c
            ctx.mark_dirty(out)
        _, E, V, n_true, n, r = normalize_math(as_ncl(X, sm), X2c, shift, tau, scale, weight, bias,
                                               eps, reduce, out=buf)
        ctx.save_for_backward(X, shift, tau, scale, weight, E, n_true, n, r)
        ctx.reduce, ctx.sample_major = reduce, sm
        ctx.mark_non_differentiable(E, V, n_true)
        return out, E, V, n_true

    @staticmethod
    def backward(ctx, dy_in, _dE, _dV, _dn):
        X_in, shift, tau, scale, weight, E, n_true, n, r = ctx.saved_tensors
        sm = ctx.sample_major
        X, dy = as_ncl(X_in, sm), as_ncl(dy_in, sm)
        C = X.shape[1]
        sr = scale[:, None] * r
        # Per-component sums sum_i tau_ik dy_i and sum_i tau_ik dy_i xc_i (local).
        gy = torch.matmul(tau, dy.transpose(1, 2)).sum(0)
        tmp = dy * X
        hy = torch.matmul(tau, tmp.transpose(1, 2)).sum(0) - shift * gy
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[6]:
            d_w = (sr * (hy - E * gy)).sum(0)
        if ctx.needs_input_grad[7]:
            d_b = gy.sum(0)  # sum_k tau_ik = 1
        if ctx.needs_input_grad[0]:
            # Like SyncBatchNorm: parameter grads stay local (DDP averages them), the sums
            # feeding the input gradient are global.
            if ctx.reduce is not identity:
                packed = ctx.reduce(torch.cat([gy, hy], 1))
                gy, hy = packed[:, :C], packed[:, C:]
            sg = scale[:, None] if weight is None else scale[:, None] * weight
            P = sg * r
            G, H = sg * gy, sg * hy  # sum_i (s_k tau_ik) (gamma dy_i) (xc_i)
            # dx_i = sum_k tau_ik [P_k dy_i + beta_k xc_i + alpha_k], where
            #   dL/dV_k dV_k/dx_i = tau_ik beta_k (xc_i - c_k E_k), c_k = 2 - n_true/n,
            #   dL/dE_k dE_k/dx_i = tau_ik (-r_k G_k / n_k).
            beta = -(r ** 3) * (H - E * G) / n[:, None]
            alpha = -r * G / n[:, None] - beta * (2.0 - n_true / n)[:, None] * E
            alpha = alpha - beta * shift  # X is not centered
            d_x = torch.empty_like(X_in)
            dx = _contract_into(as_ncl(d_x, sm), P, tau).mul_(dy)
            dx.addcmul_(_contract_into(tmp, beta, tau), X)
            _contract_into(dx, alpha, tau, accumulate=True)
        return d_x, None, None, None, None, None, d_w, d_b, None, None


def mixture_normalize(
    x: Tensor,
    tau: Tensor,
    scale: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    detach_posteriors: bool = True,
    shift: Optional[Tensor] = None,
) -> Tensor:
    """The training-mode MN transform for given posteriors (no GMM fitting).

    x (N, C, L), tau (N, K, L) summing to 1 over K, scale (K,) = 1/sqrt(lambda) or None.
    detach_posteriors=True uses the hand-written backward (tau constant); False lets
    autograd differentiate through tau as well. shift (C,): constant the squares are
    centered on (default 0); it matters only when a clamp on n_k is active, where E_k
    shrinks toward it.
    """
    if scale is None:
        scale = x.new_ones(tau.shape[1])
    if shift is None:
        shift = x.new_zeros(x.shape[1])
    shift = shift.detach()
    if detach_posteriors:
        x = viewable(x)
        sm = is_sample_major(x)
        x2c = as_ncl(x.detach() - shift[:, None], sm).square_()
        tau = as_ncl(tau.detach(), sm)  # the layout the Function sees x in
        return MixtureNormFunction.apply(x, x2c, None, shift, tau, scale, weight, bias, eps, identity)[0]
    x2c = (x - shift[:, None]).square()
    return normalize_math(x, x2c, shift, tau, scale, weight, bias, eps, identity)[0]


# ----------------------------------------------------------------------------------------
# Per-channel posteriors
# ----------------------------------------------------------------------------------------


def _weighted(tau: Tensor, W: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """sum_k tau_ikc W_kc, (B, C, L): a loop over the K slabs (K is small), each an X-sized
    multiply-add, which beats building and reducing a (K, B, C, L) product."""
    w = W[:, :, None]
    acc = torch.mul(tau[0], w[0], out=out) if out is not None else tau[0] * w[0]
    for k in range(1, tau.shape[0]):
        acc = acc.addcmul_(tau[k], w[k]) if out is not None else torch.addcmul(acc, tau[k], w[k])
    return acc


def mix_apply_per_channel(X: Tensor, tau: Tensor, P: Tensor, Q: Tensor, out: Optional[Tensor] = None
                          ) -> Tensor:
    """y_ic = x_ic sum_k tau_ikc P_kc + sum_k tau_ikc Q_kc for X (B, C, L), tau (K, B, C, L).
    With `out` (no autograd), y is written there (unless compiling: see gmm_per_channel.eager_buffers)."""
    if out is None or torch.compiler.is_compiling():
        return torch.addcmul(_weighted(tau, Q), X, _weighted(tau, P))
    _weighted(tau, P, out).mul_(X)
    for k in range(tau.shape[0]):
        out.addcmul_(tau[k], Q[k, :, None])
    return out


def normalize_math_per_channel(X, X2c, shift, tau, scale, weight, bias, eps: float, reduce,
                               out: Optional[Tensor] = None):
    """The per-channel training transform (autograd-differentiable); as normalize_math."""
    n_true, s1, s2 = pc.reduce_stats(reduce, *pc.moments(tau, X, X2c, shift))
    n = n_true.clamp_min(1.0)  # the spec's guard against 0/0 for a component empty in a channel
    E = s1 / n
    V = ((s2 - 2.0 * E * s1) / n + (n_true / n) * E * E).clamp_min(0.0)
    r = torch.rsqrt(V + eps)
    P, Q = coefficients(scale, r, E + shift, weight, bias)
    return mix_apply_per_channel(X, tau, P, Q, out), E, V, n_true, n, r


class PerChannelFunction(torch.autograd.Function):
    """Per-channel training transform with constant posteriors; MixtureNormFunction's
    twin (same arguments, same output-buffer reuse) with tau (K, B, C, L).

    Backward: the joint derivation holds per (k, c) with tau_ikc in place of tau_ik:
        dx_ic = sum_k tau_ikc [P_kc dy_ic + beta_kc x_ic + alpha_kc]
    with the same beta, alpha (from the tau-weighted sums of dy and dy * x per (k, c)).
    """

    @staticmethod
    def forward(ctx, X, X2c, out, shift, tau, scale, weight, bias, eps, reduce):
        sm = is_sample_major(X)
        if out is not None:
            ctx.mark_dirty(out)
        y, E, V, n_true, n, r = normalize_math_per_channel(as_ncl(X, sm), X2c, shift, tau, scale, weight,
                                                           bias, eps, reduce, out=None if out is None else X2c)
        if out is None:  # under torch.compile, which manages memory itself
            out = from_ncl(y, X.shape, sm)
        ctx.save_for_backward(X, shift, tau, scale, weight, E, n_true, n, r)
        ctx.reduce, ctx.sample_major = reduce, sm
        ctx.mark_non_differentiable(E, V, n_true)
        return out, E, V, n_true

    @staticmethod
    def backward(ctx, dy_in, _dE, _dV, _dn):
        X_in, shift, tau, scale, weight, E, n_true, n, r = ctx.saved_tensors
        sm = ctx.sample_major
        X, dy = as_ncl(X_in, sm), as_ncl(dy_in, sm)
        tmp = dy * X
        gy = pc.sums(tau, dy)
        hy = pc.sums(tau, tmp) - shift * gy
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[6]:
            d_w = (scale * r * (hy - E * gy)).sum(0)
        if ctx.needs_input_grad[7]:
            d_b = gy.sum(0)
        if ctx.needs_input_grad[0]:
            gy, hy = pc.reduce_stats(ctx.reduce, gy, hy)  # global sums, local parameter grads (as SyncBN)
            sg = scale if weight is None else scale * weight
            P, G, H = sg * r, sg * gy, sg * hy
            beta = -(r ** 3) * (H - E * G) / n
            alpha = -r * G / n - beta * (2.0 - n_true / n) * E - beta * shift
            if not pc.eager_buffers():
                dx = _weighted(tau, P) * dy + _weighted(tau, beta) * X + _weighted(tau, alpha)
                return from_ncl(dx, X_in.shape, sm), None, None, None, None, None, d_w, d_b, None, None
            d_x = torch.empty_like(X_in)
            dx = _weighted(tau, P, out=as_ncl(d_x, sm)).mul_(dy)
            dx.addcmul_(_weighted(tau, beta, out=tmp), X)
            for k in range(tau.shape[0]):
                dx.addcmul_(tau[k], alpha[k, :, None])
        return d_x, None, None, None, None, None, d_w, d_b, None, None


def tau_like_input_per_channel(tau: Tensor, shape: torch.Size, sample_major: bool) -> Tensor:
    """Per-channel tau (K, B, C, L) as (N, K, C, *spatial) for an input of `shape` (N, C, *spatial)."""
    K = tau.shape[0]
    if sample_major:  # (K, 1, C, M), M running over (n, *spatial)
        return tau[:, 0].reshape(K, shape[1], shape[0], *shape[2:]).movedim(2, 0)
    return tau.movedim(0, 1).reshape(shape[0], K, *shape[1:])
