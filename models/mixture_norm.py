"""Mixture Normalization (MN), Kalayeh & Shah, arXiv:1806.02892: the layer.

Implements docs/mixture-normalization.md: models/gmm.py (the mixture and its EM; models/gmm_per_channel.py
for per-channel mixtures), models/mixture_transform.py (the transform and its autograd functions),
models/mixture_state.py (what a step writes back), and this one, the layer that runs them and keeps their
state. With fuse, models/fused.py runs the layer as a compiled graph; models/sync_norms.py synchronizes it
(and BatchNorm) over processes.

One training step (MixtureNorm._batch_forward): em_steps EM iterations on at most em_samples samples,
warm-started from the previous step's GMM (k-means++ seeding on the first step); posteriors of every
sample under the result; the transform; then the running averages, and dead components reseeded.

Squares are always taken of x - shift, with shift = sum_k lambda_k mu_k of the GMM state
(batch-independent, identical on every rank), so E[x^2] - E[x]^2 style formulas do not
cancel catastrophically when |mean| >> std; the output does not depend on the shift.

Two options choose the variants the paper leaves open (defaults: the above):
posteriors="per_channel" (one 1-D mixture per channel, tau per (sample, channel)) and fit="fresh":
each training step fits the mixture from scratch on EM's subsample instead of warm-starting, its
components relabelled to match the previous step's (gmm.align), since the running averages average
component k over steps and need k to mean the same mode.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from models import gmm as joint
from models import gmm_per_channel as pc
from models.fused import region_for, resolve
from models.gmm import GMM, align, features, scale_of, snapshot, subsample
from models.mixture_options import invalid_option
from models.mixture_state import running_transform, write_back
from models.mixture_transform import (MixtureNormFunction, PerChannelFunction, as_ncl, from_ncl, is_sample_major,
                                      mix_apply, mix_apply_per_channel, normalize_math, normalize_math_per_channel,
                                      tau_like_input_per_channel, viewable)
from models.sync_norms import SyncedStatistics

__all__ = ["MixtureNorm", "MixtureNorm1d", "MixtureNorm2d"]


class MixtureNorm(SyncedStatistics, nn.Module):
    """Base of MixtureNorm1d/2d: input (N, C, *), any memory layout (channels-last is the
    fast path on CPU: each sum over samples is a single GEMM).

    Buffers (all in state_dict, so a resumed run continues exactly):
      gmm_lambda, gmm_mu, gmm_sigma2   EM state: last step's fit, the warm start of the next
      initialized, dead_count          k-means++ done; consecutive steps with lambda < lambda_min
      running_lambda/_mu/_sigma2,      eval-mode GMM and per-component statistics, momentum
      running_E, running_V,            averages like BN's (only with track_running_stats)
      num_batches_tracked
    The weights (gmm_lambda, running_lambda) and dead_count are (K,) for joint posteriors and
    (K, C) for per-channel ones; the means and variances are (K, C) either way.
    """

    # "A few EM iterations" after the k-means++ seeding on the first training step.
    init_em_steps = 10

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        em_steps: int = 1,
        em_samples: int = 4096,
        lambda_min: float = 1e-2,
        var_floor: float = 1e-4,
        prior_scaling: bool = True,
        detach_posteriors: bool = True,
        dead_steps: int = 5,
        posteriors: str = "joint",
        fit: str = "warm",
        fuse: str = "auto",
        device=None,
        dtype=None,
    ):
        """
        num_features: C.  num_components: K (K = 1 is exactly BatchNorm).
        eps, momentum, affine, track_running_stats: as in nn.BatchNorm2d (momentum=None:
            cumulative average). momentum also averages the eval-mode GMM.
        em_steps: EM iterations per training step, warm-started from the previous step's
            GMM. 0 freezes the GMM after its initialization.
        em_samples: EM runs on a random subsample of at most this many samples (per
            process: em_samples // world_size); posteriors for the transform use all.
        lambda_min: floor of lambda_k in the 1/sqrt(lambda_k) factor, and the weight below
            which a component counts as dead.
        var_floor: sigma2_kc >= var_floor * (Var_c + eps), Var_c the channel's variance
            over the EM samples. Relative, so EM is as scale-invariant as BN; 1e-4 lets a
            component be as narrow as 1% of the channel's std.
        prior_scaling: keep the Fisher-vector factor 1/sqrt(lambda_k).
        detach_posteriors: treat tau as constants in the backward pass.
        dead_steps: a component with lambda < lambda_min for this many consecutive
            training steps is reseeded (k-means++ against the others). 5 tolerates a few
            unlucky batches without leaving a dead component for long.
        posteriors: "joint": one C-dimensional diagonal GMM, so a sample has the same
            posteriors in every channel; "per_channel": one 1-D GMM per channel, posteriors
            per (sample, channel) (models/gmm_per_channel.py).
        fit: "warm": EM continues from the previous step's GMM; "fresh": every training step
            fits from scratch (k-means++ seeding on EM's subsample, then em_steps EM
            iterations; em_steps = 0 keeps the seeds), relabelled to match the previous
            step's components. Fresh fits need no dead-component reseeding: every component
            is re-seeded every step.
        fuse: "auto" (on a GPU), "always" or "never": run the layer's forward (and so its backward) as
            one torch.compile'd graph instead of dozens of tiny launches and their Python (models/fused.py).
            The result is the same up to rounding.
        """
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        bad = invalid_option(num_components, eps, momentum, em_steps, em_samples, lambda_min, var_floor,
                             dead_steps, posteriors, fit, fuse)
        if bad:
            raise ValueError(f"{bad[0]} must be {bad[1]}")
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.em_steps = em_steps
        self.em_samples = em_samples
        self.lambda_min = lambda_min
        self.var_floor = var_floor
        self.prior_scaling = prior_scaling
        self.detach_posteriors = detach_posteriors
        self.dead_steps = dead_steps
        self.posteriors = posteriors
        self.fit = fit
        self.fuse = fuse
        # Distributed (models/sync_norms.py): set by sync_norms; not part of the state.
        self.sync = False
        self.process_group = None

        k, c = num_components, num_features
        lam_shape = (k,) if posteriors == "joint" else (k, c)
        if affine:
            self.weight = nn.Parameter(torch.empty(c, **factory))
            self.bias = nn.Parameter(torch.empty(c, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("gmm_lambda", torch.empty(lam_shape, **factory))
        self.register_buffer("gmm_mu", torch.empty(k, c, **factory))
        self.register_buffer("gmm_sigma2", torch.empty(k, c, **factory))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("dead_count", torch.zeros(lam_shape, dtype=torch.long, device=device))
        if track_running_stats:
            self.register_buffer("running_lambda", torch.empty(lam_shape, **factory))
            for name in ("running_mu", "running_sigma2", "running_E", "running_V"):
                self.register_buffer(name, torch.empty(k, c, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        else:
            for name in ("running_lambda", "running_mu", "running_sigma2", "running_E", "running_V",
                         "num_batches_tracked"):
                self.register_buffer(name, None)
        # Python mirror of `initialized`, so a training step does not read a device tensor
        # (a GPU sync) just to learn that the GMM exists.
        self._ready: Optional[bool] = None
        self.reset_parameters()

    # -- BN-like housekeeping ---------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Forgets the GMM and the running statistics (the next training step re-seeds)."""
        k = self.num_components
        with torch.no_grad():
            self.gmm_lambda.fill_(1.0 / k)
            self.gmm_mu.zero_()
            self.gmm_sigma2.fill_(1.0)
            self.initialized.fill_(False)
            self.dead_count.zero_()
            if self.track_running_stats:
                self.running_lambda.fill_(1.0 / k)
                self.running_mu.zero_()
                self.running_sigma2.fill_(1.0)
                self.running_E.zero_()
                self.running_V.fill_(1.0)
                self.num_batches_tracked.zero_()
        self._ready = False

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            "{num_features}, num_components={num_components}, eps={eps}, momentum={momentum}, "
            "affine={affine}, track_running_stats={track_running_stats}, em_steps={em_steps}, "
            "em_samples={em_samples}, lambda_min={lambda_min}, var_floor={var_floor}, "
            "prior_scaling={prior_scaling}, detach_posteriors={detach_posteriors}, "
            "dead_steps={dead_steps}, posteriors={posteriors}, fit={fit}, fuse={fuse}".format(**self.__dict__)
        )

    # -- forward ------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)  # before any compiled code, which cannot raise for bad input
        if self._fused(input):
            return region_for(self.extra_repr(), _layer_forward)(True, self, input)
        return self._forward(input, None)

    def _fused(self, input: Tensor) -> bool:
        """Whether this call runs as a compiled graph (models/fused.py): with fuse on for the input's device, not
        when an enclosing torch.compile traces the layer anyway, once the mixture exists (the first training
        step's k-means++ seeding stays eager), and in one process (several all-reduce their sums eagerly)."""
        if not resolve(self.fuse, input) or torch.compiler.is_compiling():
            return False
        if (self.training or not self.track_running_stats) and not self._is_ready():
            return False
        return self._world()[0] == 1

    def forward_with_info(self, input: Tensor) -> tuple[Tensor, dict]:
        """forward plus what it used: posteriors tau (N, K, *) (the input's shape with C -> K),
        n = sum_i tau (K,), E, V (K, C) in input units, scale (K,) = 1/sqrt(lambda) or 1, and
        the GMM (lam, mu, sigma2) the posteriors came from. Per-channel posteriors: tau is
        (N, K, C, *), and n, scale and lam are (K, C)."""
        self._check_input(input)
        info: dict = {}
        return self._forward(input, info), info

    def _check_input(self, input: Tensor) -> None:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {input.shape[1]}")
        if self.training and input.numel() == input.shape[1] and self._world()[0] == 1:
            raise ValueError("Expected more than 1 value per channel when training")

    def _forward(self, input: Tensor, info: Optional[dict]) -> Tensor:
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        # Statistics in float32 even under autocast: EM and variances in bf16 are useless.
        with torch.autocast(device_type=input.device.type, enabled=False):
            X = viewable(input.to(dtype))
            if self.training or not self.track_running_stats:
                Y = self._batch_forward(X, self.training, info)
            else:
                Y = self._running_forward(X, info)
        return Y.to(input.dtype)

    def _affine(self, dtype):
        if not self.affine:
            return None, None
        return self.weight.to(dtype), self.bias.to(dtype)

    def _is_ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def _batch_forward(self, X: Tensor, update: bool, info: Optional[dict]) -> Tensor:
        """Training mode (update=True), or eval without running stats (nothing is written)."""
        world, _ = self._world()
        K, dtype = self.num_components, X.dtype
        ready = self._is_ready()
        reduce = self._reducer()
        sm = is_sample_major(X)
        per_channel, fresh = self.posteriors == "per_channel", self.fit == "fresh"
        gains = (self.lambda_min, self.prior_scaling)
        W = log_norm = None
        with torch.no_grad():
            X3 = as_ncl(X.detach(), sm)
            N, C, L = X3.shape
            if ready:
                gmm = GMM(self.gmm_lambda.to(dtype), self.gmm_mu.to(dtype), self.gmm_sigma2.to(dtype))
                if update and torch.compiler.is_compiling():  # the buffers change before backward
                    gmm = snapshot(gmm)
                # The mixture centered on its own mean (the shift), and a joint E-step's weights W.
                shift, gmm, W, log_norm = joint.centered(*gmm)
            else:
                stats = self._all_reduce(torch.cat([X.new_full((1,), float(N * L)), X3.sum((0, 2))]))
                shift = stats[1:] / stats[0]
            # Every sample's [1, x - shift, (x - shift)^2]: EM and the statistics run on these.
            D = features(X3, shift)

            # EM, warm-started from the previous step's GMM or fitted afresh (centered coordinates).
            Ds = subsample(D, max(K, self.em_samples // world))
            if not ready or fresh:
                em = pc if per_channel else joint
                fitted = em.init_gmm(Ds, K, self.em_steps if fresh else self.init_em_steps, self.var_floor,
                                     self.eps, reduce, self._first_rank_only)
                gmm, W = (align(fitted, gmm) if ready else fitted), None
            iters = 0 if fresh else self.em_steps
            dist = None
            if per_channel:
                for it in range(iters):
                    gmm, dist = pc.em_step(Ds, gmm, self.var_floor, self.eps, reduce, want_dist=it == iters - 1)
                scale = scale_of(gmm.lam, *gains)
            else:
                if W is None:
                    W, log_norm, scale = joint.natural_scaled(gmm, *gains)
                elif iters == 0:  # the stored mixture kept as it is: centered gave its W
                    scale = scale_of(gmm.lam, *gains)
                # Each iteration: the E-step's log-densities (one GEMM), the posteriors, their sums (one GEMM),
                # then the M-step and the next E-step's weights (fit_step).
                for it in range(iters):
                    logj = joint.log_joint(Ds, W)
                    S = reduce(joint.moments(joint.posteriors(logj), Ds))
                    if it == iters - 1:
                        dist = (logj, log_norm)
                    gmm, W, log_norm, scale = joint.fit_step(S, gmm, self.var_floor, self.eps, *gains)
        weight, bias = self._affine(dtype)

        # Posteriors of every sample under the fitted GMM, then the transform.
        if self.detach_posteriors:
            with torch.no_grad():
                tau = self._posteriors(D, gmm, W)
            fn = PerChannelFunction if per_channel else MixtureNormFunction
            y, E, V, n_true = fn.apply(X, D, shift, tau, scale, weight, bias, self.eps, reduce)  # E in input units
        else:
            X3 = as_ncl(X, sm)
            Dg = features(X3, shift)  # differentiable in x
            tau = self._posteriors(Dg, gmm, W)
            normalize = normalize_math_per_channel if per_channel else normalize_math
            y, st = normalize(X3, Dg, shift, tau, scale, weight, bias, self.eps,
                              lambda t: self._all_reduce(t, differentiable=True))
            y = from_ncl(y, X.shape, sm)
            E, V, n_true = st.center.detach(), st.V.detach(), st.n_true.detach()
            n_true = n_true if per_channel else n_true[:, 0]

        if info is not None:
            tau_out = (tau_like_input_per_channel(tau.detach(), X.shape, sm) if per_channel
                       else from_ncl(tau.detach(), (X.shape[0], K, *X.shape[2:]), sm))
            info.update(tau=tau_out, n=n_true, E=E, V=V, scale=scale,
                        lam=gmm.lam, mu=gmm.mu + shift, sigma2=gmm.sigma2)
        if update:
            with torch.no_grad():
                write_back(self, gmm, shift, E, V, n_true, ready, Ds, dist)
                if not ready:
                    self.initialized.fill_(True)
                    self._ready = True
        return y

    def _posteriors(self, D: Tensor, gmm: GMM, W: Optional[Tensor]) -> Tensor:
        """tau of the samples of the features D under gmm (centered like D); a joint mixture's E-step weights W
        (joint.natural(gmm)) come with it."""
        if self.posteriors == "per_channel":
            return pc.posteriors(pc.log_joint(D, gmm))
        return joint.posteriors(joint.log_joint(D, W))

    def _running_forward(self, X: Tensor, info: Optional[dict]) -> Tensor:
        """Eval mode: running GMM posteriors and running E_k, V_k; no batch dependence."""
        dtype, shape, sm = X.dtype, X.shape, is_sample_major(X)
        X = as_ncl(X, sm)
        per_channel = self.posteriors == "per_channel"
        weight, bias = self._affine(dtype)
        running = (self.running_lambda, self.running_mu, self.running_sigma2, self.running_E, self.running_V)
        shift, gmm, W, scale, P, Q = running_transform(*(t.to(dtype) for t in running),
                                                       weight, bias, self.eps, self.lambda_min, self.prior_scaling)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_posteriors):
            D = features(X, shift)
            tau = self._posteriors(D, gmm, W)
        if info is not None:
            tau_out = (tau_like_input_per_channel(tau.detach(), shape, sm) if per_channel
                       else from_ncl(tau.detach(), (shape[0], tau.shape[1], *shape[2:]), sm))
            n = tau.detach().sum((1, 3) if per_channel else (0, 2))
            info.update(tau=tau_out, n=n, E=self.running_E.to(dtype), V=self.running_V.to(dtype),
                        scale=scale, lam=gmm.lam, mu=gmm.mu + shift, sigma2=gmm.sigma2)
        if per_channel:
            return from_ncl(mix_apply_per_channel(X, tau, P, Q), shape, sm)
        needs_grad = torch.is_grad_enabled() and (X.requires_grad or tau.requires_grad or P.requires_grad)
        out = None if needs_grad else torch.empty_like(X)
        return from_ncl(mix_apply(X, tau, P, Q, out=out), shape, sm)


def _layer_forward(layer: MixtureNorm, input: Tensor) -> Tensor:
    return layer._forward(input, None)


class MixtureNorm2d(MixtureNorm):
    """Mixture Normalization for (N, C, H, W) input; drop-in beside nn.BatchNorm2d."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class MixtureNorm1d(MixtureNorm):
    """Mixture Normalization for (N, C) or (N, C, L) input; drop-in beside nn.BatchNorm1d."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")

