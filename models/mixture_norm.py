"""Mixture Normalization (MN), Kalayeh & Shah, arXiv:1806.02892: the layer, a drop-in beside nn.BatchNorm2d.

The maths is models/mixture_core.py, in the order of docs/mixture-normalization.md; this module keeps its state
(buffers, state_dict), checks its options (models/mixture_options.py), picks eager or compiled (models/fused.py)
and sums over processes (models/sync_norms.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from models import mixture_core as core
from models import mixture_fast as fast
from models.fused import region_for, resolve, snapshot
from models.mixture_options import invalid_option
from models.sync_norms import SyncedStatistics

__all__ = ["MixtureNorm", "MixtureNorm1d", "MixtureNorm2d"]

_RUNNING = ("running_lambda", "running_mu", "running_sigma2", "running_E", "running_V")
# The constructor's options after num_features, each kept as an attribute of the same name.
OPTIONS = ("num_components", "eps", "momentum", "affine", "track_running_stats", "em_steps", "em_samples", "lambda_min",
           "var_floor", "prior_scaling", "detach_posteriors", "dead_steps", "posteriors", "fit", "fuse")


class MixtureNorm(SyncedStatistics, nn.Module):
    """Base of MixtureNorm1d/2d, for input (N, C, *).

    Buffers (all in state_dict, so a resumed run continues exactly):
      gmm_lambda, gmm_mu, gmm_sigma2   the last step's mixture (input units), the next step's warm start
      initialized, dead_count          a mixture exists; consecutive steps with lambda < lambda_min
      running_lambda/_mu/_sigma2,      eval mode's mixture and per-component E_k, V_k: momentum averages like
      running_E, running_V,            BatchNorm's (only with track_running_stats)
      num_batches_tracked
    The weights and dead_count are (K,) for joint posteriors and (K, C) per channel; means and variances (K, C).
    """

    # "A few EM iterations" after the k-means++ seeding on the first training step.
    init_em_steps = 10
    # Eagerly, with fixed posteriors, the transform is models/mixture_fast.py's; False runs autograd through the
    # core instead (the same results: what `bench norm` times the fast path against).
    fast_backward = True

    def __init__(self, num_features: int, num_components: int = 3, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 em_steps: int = 1, em_samples: int = 4096, lambda_min: float = 1e-2, var_floor: float = 1e-4,
                 prior_scaling: bool = True, detach_posteriors: bool = True, dead_steps: int = 5,
                 posteriors: str = "joint", fit: str = "warm", fuse: str = "auto", device=None, dtype=None):
        """The options are the spec's table (docs/mixture-normalization.md, "The options"); eps, momentum, affine
        and track_running_stats as nn.BatchNorm2d's. fuse: "auto" (on a GPU), "always" or "never": run the layer
        as one compiled graph (models/fused.py); the same results up to rounding."""
        super().__init__()
        bad = invalid_option(num_components, eps, momentum, em_steps, em_samples, lambda_min, var_floor,
                             dead_steps, posteriors, fit, fuse)
        if bad:
            raise ValueError(f"{bad[0]} must be {bad[1]}")
        self.num_features, self.num_components, self.eps, self.momentum = num_features, num_components, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.em_steps, self.em_samples, self.lambda_min, self.var_floor = em_steps, em_samples, lambda_min, var_floor
        self.prior_scaling, self.detach_posteriors, self.dead_steps = prior_scaling, detach_posteriors, dead_steps
        self.posteriors, self.fit, self.fuse = posteriors, fit, fuse
        factory = {"device": device, "dtype": dtype}
        k, c = num_components, num_features
        lam_shape = (k,) if posteriors == "joint" else (k, c)
        for name in ("weight", "bias"):
            self.register_parameter(name, nn.Parameter(torch.empty(c, **factory)) if affine else None)
        self.register_buffer("gmm_lambda", torch.empty(lam_shape, **factory))
        self.register_buffer("gmm_mu", torch.empty(k, c, **factory))
        self.register_buffer("gmm_sigma2", torch.empty(k, c, **factory))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("dead_count", torch.zeros(lam_shape, dtype=torch.long, device=device))
        for name in _RUNNING:
            shape = lam_shape if name == "running_lambda" else (k, c)
            self.register_buffer(name, torch.empty(shape, **factory) if track_running_stats else None)
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
                             if track_running_stats else None)
        # Python mirror of `initialized`: a training step need not read a device tensor (a GPU sync) to learn that
        # the mixture exists.
        self._ready: Optional[bool] = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Forgets the mixture and the running estimates (the next training step seeds again)."""
        with torch.no_grad():
            for name, value in (("gmm_lambda", 1.0 / self.num_components), ("gmm_mu", 0.0), ("gmm_sigma2", 1.0),
                                ("initialized", False), ("dead_count", 0), ("running_lambda", 1.0 / self.num_components),
                                ("running_mu", 0.0), ("running_sigma2", 1.0), ("running_E", 0.0), ("running_V", 1.0),
                                ("num_batches_tracked", 0)):
                if getattr(self, name) is not None:
                    getattr(self, name).fill_(value)
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
        return ", ".join([str(self.num_features)] + [f"{n}={getattr(self, n)}" for n in OPTIONS])

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)  # before any compiled code, which cannot raise for bad input
        if self._fused(input):
            return region_for(self.extra_repr(), _layer_forward)(True, self, input)
        return self._forward(input, None)

    def forward_with_info(self, input: Tensor) -> tuple[Tensor, dict]:
        """forward plus what it used: posteriors tau (N, K, *) (the input's shape with C -> K; per channel
        (N, K, C, *)), n = sum_i tau (K,), E, V (K, C) in input units, scale (K,) = the gain, and the mixture
        (lam, mu, sigma2) the posteriors came from; n, scale and lam are (K, C) per channel."""
        self._check_input(input)
        info: dict = {}
        return self._forward(input, info), info

    def _fused(self, input: Tensor) -> bool:
        """Whether this call runs compiled: with fuse on for the input's device, not inside an enclosing
        torch.compile (which compiles the layer anyway), once the mixture exists (the first step's k-means++
        seeding stays eager), and in one process (several all-reduce their sums eagerly)."""
        if not resolve(self.fuse, input) or torch.compiler.is_compiling():
            return False
        if (self.training or not self.track_running_stats) and not self._is_ready():
            return False
        return self._world()[0] == 1

    def _check_input(self, input: Tensor) -> None:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {input.shape[1]}")
        if self.training and input.numel() == input.shape[1] and self._world()[0] == 1:
            raise ValueError("Expected more than 1 value per channel when training")

    def _is_ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def _options(self) -> core.Options:
        world = self._world()[0]
        return core.Options(self.num_components, 1 if self.posteriors == "joint" else self.num_features, self.eps,
                            self.em_steps, self.em_samples // world, self.init_em_steps, self.lambda_min,
                            self.var_floor, self.prior_scaling, self.detach_posteriors, self.dead_steps,
                            self.fit == "fresh")

    def _mixture(self, *names: str, dtype) -> core.GMM:
        """A mixture from buffers, lam as (K, G)."""
        lam, mu, sigma2 = (getattr(self, n).to(dtype) for n in names)
        return core.GMM(lam.reshape(self.num_components, -1), mu, sigma2)

    def _forward(self, input: Tensor, info: Optional[dict]) -> Tensor:
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        C = self.num_features
        # Samples as the rows of an (M, C) matrix: a view of channels-last input. Statistics in float32 even under
        # autocast: EM and variances in bf16 are useless.
        with torch.autocast(device_type=input.device.type, enabled=False):
            x = input.to(dtype).movedim(1, -1).reshape(-1, C)
            weight, bias = (self.weight.to(dtype), self.bias.to(dtype)) if self.affine else (None, None)
            o = self._options()
            if self.training or not self.track_running_stats:
                step = self._train(x, weight, bias, o)
                y, tau, stats = step.y, step.tau, (step.n, step.E, step.V, step.fit._replace(mu=step.fit.mu + step.shift))
            else:
                running = self._mixture("running_lambda", "running_mu", "running_sigma2", dtype=dtype)
                E, V = self.running_E.to(dtype), self.running_V.to(dtype)
                y, tau = core.eval_forward(x, running, E, V, weight, bias, o)
                stats = (tau.detach().sum(0), E, V, running)
        if info is not None:
            self._report(info, input.shape, tau.detach(), *stats, o)
        # In the input's memory layout, as BatchNorm's output is: the rows come back channels-last, and the
        # convolutions after the layer, fed channels-last activations, ran their backward 1.5x slower on a CPU.
        y = y.reshape(input.shape[0], *input.shape[2:], C).movedim(-1, 1).to(input.dtype)
        return y.contiguous(memory_format=_layout(input))

    def _train(self, x: Tensor, weight, bias, o: core.Options) -> core.Step:
        """A batch-statistics step; in training mode it also writes the state back."""
        ready = self._is_ready()
        stored = self._mixture("gmm_lambda", "gmm_mu", "gmm_sigma2", dtype=x.dtype) if ready else None
        if stored is not None and self.training and torch.compiler.is_compiling():
            stored = snapshot(stored)  # the buffers change before backward
        # Eagerly, fixed posteriors take the hand-written backward; compiled, Inductor fuses the core's own.
        eager_fast = self.fast_backward and self.detach_posteriors and not torch.compiler.is_compiling()
        step = core.train_forward(x, stored, weight, bias, o, self._reducer(), self._first_rank_only,
                                  transform_fn=fast.transform if eager_fast else core.transform)
        if self.training:
            with torch.no_grad():
                self._write_back(step, ready, o)
        return step

    def _write_back(self, step: core.Step, ready: bool, o: core.Options) -> None:
        """The state after a step, copied into the buffers in one call."""
        K = self.num_components
        track = self.track_running_stats
        running = self._mixture("running_lambda", "running_mu", "running_sigma2", dtype=step.E.dtype) if track else None
        if track:
            count = self.num_batches_tracked + 1
            f = 1.0 / count.to(step.E.dtype) if self.momentum is None else self.momentum  # no host read
        else:
            f = None
        dead = self.dead_count.reshape(K, -1)
        state = core.next_state(step, dead, running, self.running_E if track else None,
                                self.running_V if track else None, f, not ready, o, self._first_rank_only)
        bufs = [self.gmm_lambda, self.gmm_mu, self.gmm_sigma2, self.dead_count]
        values = [*state.stored, state.dead_count]
        if track:
            bufs += [getattr(self, n) for n in _RUNNING] + [self.num_batches_tracked]
            values += [*state.running, state.running_E, state.running_V, count]
        torch._foreach_copy_(bufs, [v.reshape(b.shape) for b, v in zip(bufs, values)])
        if not ready:
            self.initialized.fill_(True)
            self._ready = True

    def _report(self, info: dict, shape, tau: Tensor, n, E, V, gmm: core.GMM, o: core.Options) -> None:
        """forward_with_info's values, shaped as the buffers and the input."""
        K, joint = self.num_components, self.posteriors == "joint"
        tau = tau.reshape(shape[0], *shape[2:], K, -1)  # (N, *spatial, K, G)
        tau = tau[..., 0].movedim(-1, 1) if joint else tau.movedim(-2, 1).movedim(-1, 2)
        lam = gmm.lam[:, 0] if joint else gmm.lam
        info.update(tau=tau, n=n.detach()[:, 0] if joint else n.detach(), E=E.detach(), V=V.detach(),
                    scale=core.gain(lam, o), lam=lam, mu=gmm.mu, sigma2=gmm.sigma2)


def _layer_forward(layer: MixtureNorm, input: Tensor) -> Tensor:
    return layer._forward(input, None)


def _layout(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored that way (and not also plain contiguous), else contiguous."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


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
