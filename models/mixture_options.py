"""The rules MN's options must satisfy, stated once: the layer (models/mixture_norm.py) refuses what they
refuse, and the config check (gan/core/config.py) refuses the same values before anything slow runs."""
from __future__ import annotations

import math

LAMBDA_MIN_LOW = 2.0 ** -126  # float32's smallest normal number
CHOICES = {"posteriors": ("joint", "per_channel"), "fit": ("warm", "fresh"), "fuse": ("auto", "always", "never")}


def invalid_option(num_components: int = 3, eps: float = 1e-5, momentum: float | None = 0.1, em_steps: int = 1,
                   em_samples: int = 4096, lambda_min: float = 1e-2, var_floor: float = 1e-4, dead_steps: int = 5,
                   posteriors: str = "joint", fit: str = "warm", fuse: str = "auto", **_) -> tuple[str, str] | None:
    """The first option that breaks a rule, as (name, what it must be), or None when all are valid.

    Defaults as the layer's, so a caller passes only what it sets; other options (affine ...) have no rule."""
    k = num_components
    rules = [
        ("num_components", k >= 1, ">= 1"),
        ("eps", _finite(eps) and eps > 0, "> 0"),
        ("momentum", momentum is None or (_finite(momentum) and 0 <= momentum <= 1), "in [0, 1] (or None)"),
        ("em_steps", em_steps >= 0, ">= 0"),
        # EM's sample variances need two samples, and k-means++ one distinct seed per component.
        ("em_samples", em_samples >= max(2, k), f">= max(2, num_components) = {max(2, k)}"),
        # Below 1/K not every component can be "dead" at once, so re-seeding always has an anchor; from
        # float32's smallest normal number up, the prior gain 1/sqrt(lambda_k) is finite in the float32 that
        # MN computes in (a smaller lambda_min is 0 there, or a denormal).
        ("lambda_min", _finite(lambda_min) and LAMBDA_MIN_LOW <= lambda_min and lambda_min * max(k, 1) < 1,
         f"in [{LAMBDA_MIN_LOW:.3g}, 1/num_components) = [{LAMBDA_MIN_LOW:.3g}, {1 / max(k, 1):.4g})"),
        ("var_floor", _finite(var_floor) and var_floor > 0, "> 0"),
        ("dead_steps", dead_steps >= 1, ">= 1"),
    ] + [(name, value in CHOICES[name], "one of " + ", ".join(CHOICES[name]))
         for name, value in (("posteriors", posteriors), ("fit", fit), ("fuse", fuse))]
    for name, ok, must in rules:
        if not ok:
            return name, must
    return None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
