"""Registry of generator normalization layers: name -> factory(num_features, mn_options)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn


def _batch_norm(num_features: int, mn_options: dict) -> nn.Module:
    return nn.BatchNorm2d(num_features)


def _mixture_norm(num_features: int, mn_options: dict) -> nn.Module:
    from models.mixture_norm import MixtureNorm2d
    return MixtureNorm2d(num_features, **mn_options)


def _no_norm(num_features: int, mn_options: dict) -> nn.Module:
    return nn.Identity()


NORMS: dict[str, Callable[[int, dict], nn.Module]] = {
    "bn": _batch_norm,
    "mn": _mixture_norm,
    "none": _no_norm,
}


def make_norm(name: str, num_features: int, mn_options: dict | None = None) -> nn.Module:
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose one of {', '.join(NORMS)}")
    return NORMS[name](num_features, mn_options or {})
