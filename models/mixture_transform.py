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

Per-channel posteriors (models/gmm_per_channel.py) replace tau_ik by tau_ikc, so every
per-component quantity becomes per (component, channel):

    n_kc  = sum_i tau_ikc,   E_kc = sum_i tau_ikc x_ic / n_kc,
    V_kc  = sum_i tau_ikc (x_ic - E_kc)^2 / n_kc
    s_kc  = 1/sqrt(max(lambda_kc, lambda_min)) (prior_scaling) or 1,   r_kc = 1/sqrt(V_kc + eps)
    y_ic  = gamma_c sum_k tau_ikc s_kc r_kc (x_ic - E_kc) + beta_c
          = sum_k tau_ikc (P_kc x_ic + Q_kc),  P = gamma s r,  Q = beta - P E

and the spec's guards carry over per (k, c): n_kc clamped at 1, lambda_kc floored in s_kc. K = 1
gives BatchNorm either way. Both kinds share the statistics (`statistics`) and the backward's
algebra (`input_grad_coefficients`); they differ in how tau weights the samples.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from models import gmm_per_channel as pc
from models.gmm import Reduce, identity, moments

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
# Statistics and coefficients, both kinds of posteriors
# ----------------------------------------------------------------------------------------


class Stats(NamedTuple):
    """What the transform computes from the sums of one batch; n, c are (K, 1) for joint posteriors
    and (K, C) for per-channel ones, the rest (K, C). E is centered (on the layer's shift)."""
    n_true: Tensor  # sum_i tau_ik
    n: Tensor       # n_true clamped at 1
    c: Tensor       # n_true / n - 2
    E: Tensor
    V: Tensor
    Ve: Tensor      # V + eps
    sr: Tensor      # s r
    center: Tensor  # E + shift: the mean in input units
    P: Tensor
    Q: Tensor


def statistics(S: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Stats:
    """From the sums S = [sum_i tau, sum_i tau xc, sum_i tau xc^2]: (K, 1 + 2C) for joint posteriors,
    (K, 3C) for per-channel ones (the same thing when C = 1): E, V, r and the transform's P, Q.
    Differentiable (autograd through tau when posteriors are not detached)."""
    K, C = S.shape[0], shift.shape[0]
    joint = S.shape[1] == 1 + 2 * C
    n_true = S[:, :1] if joint else S[:, :C]
    # A component can hold almost no sample of a batch (nearly hard posteriors in wide
    # layers): clamping n_k keeps E_k, V_k finite instead of 0/0 (E_k then shrinks toward
    # the shift, i.e. the mixture's mean).
    n = n_true.clamp_min(1.0)
    if joint:  # [n_true / n | E_k | sum_i tau_ik xc_i^2 / n_k]
        mom = S / n
        ratio, E, m2 = mom[:, :1], mom[:, 1 : C + 1], mom[:, C + 1 :]
    else:
        ratio, E, m2 = (S.view(K, 3, C) / n[:, None]).unbind(1)
    # V = sum_i tau_ik (xc_i - E_k)^2 / n_k = m2 - (2 - n_true/n) E^2; the ratio differs
    # from 1 only when the clamp is active.
    c = ratio - 2.0
    V = torch.addcmul(m2, E * c, E).clamp_min(0.0)
    Ve = V + eps
    sr = (scale[:, None] if scale.dim() == 1 else scale) * Ve.rsqrt()
    center = E + shift  # the transform applies to raw x
    P, Q = coefficients(sr, center, weight, bias)
    return Stats(n_true, n, c, E, V, Ve, sr, center, P, Q)


def coefficients(sr: Tensor, center: Tensor, weight: Tensor | None, bias: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
    """y = sum_k tau_k (P_k x + Q_k): P = s_k r_k gamma, Q = beta - P center_k, for sr = s_k r_k (K, C).
    One builder for the training and the running transform, so that the two stay the same maths."""
    P = sr if weight is None else sr * weight
    Q = -P * center if bias is None else torch.addcmul(bias, P, center, value=-1.0)
    return P, Q


def input_grad_coefficients(st: Stats, shift: Tensor, gy: Tensor, hc: Tensor) -> tuple[Tensor, Tensor]:
    """dx_i = sum_k tau_ik [P_k dy_i - b_k x_i + alpha_k] (tau per channel likewise), from
    gy = sum_i tau_ik dy_i and hc = sum_i tau_ik dy_i (x_i - E_k - shift). Returns (b, alpha).

    dL/dV_k dV_k/dx_i = -tau_ik b_k (xc_i - (2 - n_true/n) E_k), b_k = P_k hc_k / (n_k (V_k + eps)),
    dL/dE_k dE_k/dx_i = -tau_ik P_k gy_k / n_k (through the mean in P_k x + Q_k)."""
    Pn = st.P / st.n
    b = torch.mul(Pn, hc).div_(st.Ve)
    ebar = torch.addcmul(shift, st.c, st.E, value=-1.0)  # (2 - n_true/n) E + shift: x is raw
    return b, torch.mul(b, ebar).addcmul_(Pn, gy, value=-1.0)


def backward_coefficients(st: Stats, shift: Tensor, gy: Tensor, m_tmp: Tensor, reduce: Reduce, input_grad: bool):
    """(d_weight, d_bias, b, alpha) of a transform's backward, from this process's sums gy = sum_i tau_ik dy_i
    and m_tmp = sum_i tau_ik dy_i x_i; b and alpha None without input_grad. Like SyncBatchNorm: the parameters'
    gradients stay local (DDP averages them), the sums feeding the input gradient are global."""
    hc = torch.addcmul(m_tmp, st.center, gy, value=-1.0)  # hc of input_grad_coefficients
    d_w, d_b = (st.sr * hc).sum(0), gy.sum(0)  # sum_k tau_ik = 1
    if not input_grad:  # nor the all-reduce: every process skips it alike
        return d_w, d_b, None, None
    if reduce is not identity:
        gy, hc = reduce(torch.cat([gy, hc], 1)).split(gy.shape[1], 1)
    return (d_w, d_b, *input_grad_coefficients(st, shift, gy, hc))


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
    """y_i = x_i * sum_k tau_ik P_k + sum_k tau_ik Q_k for X (B, C, L), tau (B, K, L); written
    into `out` (X's shape, no autograd) when given."""
    if out is None:
        return torch.addcmul(torch.matmul(Q.t(), tau), X, torch.matmul(P.t(), tau))
    _contract_into(out, P, tau).mul_(X)
    return _contract_into(out, Q, tau, accumulate=True)


def normalize_math(X, D, shift, tau, scale, weight, bias, eps: float, reduce: Reduce, out=None):
    """Spec's training-mode transform of X (B, C, L) with features D (models/gmm.py) and posteriors
    tau; differentiable by autograd when tau/X require grad. Returns y (in `out` if given) and Stats."""
    st = statistics(reduce(moments(tau, D)), shift, scale, weight, bias, eps)
    return mix_apply(X, tau, st.P, st.Q, out), st


class MixtureNormFunction(torch.autograd.Function):
    """Training transform with constant posteriors (detach_posteriors=True).

    X is (N, C, *), D the features of its as_ncl view. Returns y (X's shape and layout, a fresh
    tensor) and E (in input units), V, n_true: what the layer's state and diagnostics need.

    Hand-written backward: with tau constant the transform is a tau-weighted sum of K
    BN-like ops, and its gradient is again a few (C, K) @ (K, L) matmuls. Saves X and
    tau (N, K, L) for backward, about what BN keeps.
    """

    @staticmethod
    def forward(ctx, X, D, shift, tau, scale, weight, bias, eps, reduce):
        sm = is_sample_major(X)
        out = torch.empty_like(X)  # X's layout; not a view (the next layer's ReLU is in place)
        _, st = normalize_math(as_ncl(X, sm), D, shift, tau, scale, weight, bias, eps, reduce, out=as_ncl(out, sm))
        ctx.save_for_backward(X, shift, tau, st.n, st.c, st.E, st.Ve, st.sr, st.P, st.center)
        ctx.reduce, ctx.sample_major = reduce, sm
        n_true = st.n_true[:, 0]
        ctx.mark_non_differentiable(st.center, st.V, n_true)
        ctx.set_materialize_grads(False)
        return out, st.center, st.V, n_true

    @staticmethod
    def backward(ctx, dy_in, _dE, _dV, _dn):
        if dy_in is None:
            return (None,) * 9
        X_in, shift, tau, n, c, E, Ve, sr, P, center = ctx.saved_tensors
        sm = ctx.sample_major
        X, dy = as_ncl(X_in, sm), as_ncl(dy_in, sm)
        # Per-component sums sum_i tau_ik dy_i and sum_i tau_ik dy_i x_i (local).
        tmp = dy * X
        st = Stats(None, n, c, E, None, Ve, sr, center, P, None)
        d_w, d_b, b, alpha = backward_coefficients(st, shift, moments(tau, dy), moments(tau, tmp),
                                                   ctx.reduce, ctx.needs_input_grad[0])
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = torch.empty_like(X_in)
            dx = _contract_into(as_ncl(d_x, sm), P, tau).mul_(dy)
            dx.addcmul_(_contract_into(tmp, b, tau), X, value=-1.0)
            _contract_into(dx, alpha, tau, accumulate=True)
        return (d_x, None, None, None, None, d_w if ctx.needs_input_grad[5] else None,
                d_b if ctx.needs_input_grad[6] else None, None, None)


# ----------------------------------------------------------------------------------------
# Per-channel posteriors: tau (K, B, C, L)
# ----------------------------------------------------------------------------------------


def mix_apply_per_channel(X: Tensor, tau: Tensor, P: Tensor, Q: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y_ic = sum_k tau_ikc (P_kc x_ic + Q_kc) for X (B, C, L), tau (K, B, C, L); written into `out`
    (X's shape, no autograd) when given."""
    b = pc.bcast
    y = torch.addcmul(b(Q), b(P), X)
    if out is None or not pc.in_place(X, tau, P, Q):
        return (y * tau).sum(0)
    return torch.sum(y.mul_(tau), 0, out=out)


def normalize_math_per_channel(X, D, shift, tau, scale, weight, bias, eps: float, reduce: Reduce, out=None):
    """The per-channel training transform (autograd-differentiable); as normalize_math."""
    st = statistics(reduce(pc.moments(tau, D)), shift, scale, weight, bias, eps)
    return mix_apply_per_channel(X, tau, st.P, st.Q, out), st


class PerChannelFunction(torch.autograd.Function):
    """Per-channel training transform with constant posteriors; MixtureNormFunction's twin
    (same arguments) with tau (K, B, C, L).

    Backward: the joint derivation holds per (k, c) with tau_ikc in place of tau_ik:
        dx_ic = sum_k tau_ikc [P_kc dy_ic - b_kc x_ic + alpha_kc]
    with the same b, alpha (from the tau-weighted sums of dy and dy * x per (k, c)).
    """

    @staticmethod
    def forward(ctx, X, D, shift, tau, scale, weight, bias, eps, reduce):
        sm = is_sample_major(X)
        eager = not torch.compiler.is_compiling()
        out = torch.empty_like(X) if eager else None  # not a view: the next layer's in-place ReLU
        y, st = normalize_math_per_channel(as_ncl(X, sm), D, shift, tau, scale, weight, bias, eps, reduce,
                                           out=as_ncl(out, sm) if eager else None)
        ctx.save_for_backward(X, shift, tau, st.n, st.c, st.E, st.Ve, st.sr, st.P, st.center)
        ctx.reduce, ctx.sample_major = reduce, sm
        ctx.mark_non_differentiable(st.center, st.V, st.n_true)
        ctx.set_materialize_grads(False)
        # Under torch.compile (no out=): a copy, since an in-place ReLU may follow and the output must not be a view.
        y = out if eager else from_ncl(y, X.shape, sm).clone(memory_format=torch.preserve_format)
        return y, st.center, st.V, st.n_true

    @staticmethod
    def backward(ctx, dy_in, _dE, _dV, _dn):
        if dy_in is None:
            return (None,) * 9
        X_in, shift, tau, n, c, E, Ve, sr, P, center = ctx.saved_tensors
        sm = ctx.sample_major
        X, dy = as_ncl(X_in, sm), as_ncl(dy_in, sm)
        tdy = tau * dy
        gy = tdy.sum((1, 3))
        st = Stats(None, n, c, E, None, Ve, sr, center, P, None)
        d_w, d_b, b, alpha = backward_coefficients(st, shift, gy, tdy.mul_(X).sum((1, 3)), ctx.reduce,
                                                   ctx.needs_input_grad[0])
        d_x = None
        if ctx.needs_input_grad[0]:
            bc = pc.bcast
            # into tdy's memory, which is free now (under torch.compile, which plans memory itself: a new tensor)
            terms = torch.addcmul(bc(alpha), bc(b), X, value=-1.0, out=None if torch.compiler.is_compiling() else tdy)
            terms.addcmul_(bc(P), dy).mul_(tau)
            if torch.compiler.is_compiling():
                d_x = from_ncl(terms.sum(0), X_in.shape, sm)
            else:  # X's layout, written in place
                d_x = torch.empty_like(X_in)
                torch.sum(terms, 0, out=as_ncl(d_x, sm))
        return (d_x, None, None, None, None, d_w if ctx.needs_input_grad[5] else None,
                d_b if ctx.needs_input_grad[6] else None, None, None)


def tau_like_input_per_channel(tau: Tensor, shape: torch.Size, sample_major: bool) -> Tensor:
    """Per-channel tau (K, B, C, L) as (N, K, C, *spatial) for an input of `shape` (N, C, *spatial)."""
    K = tau.shape[0]
    if sample_major:  # (K, 1, C, M), M running over (n, *spatial)
        return tau[:, 0].reshape(K, shape[1], shape[0], *shape[2:]).movedim(2, 0)
    return tau.movedim(0, 1).reshape(shape[0], K, *shape[1:])
