"""What the generator's normalization layers see: the library half of `cli.py diagnose`.

For every BatchNorm / MixtureNorm layer of a generator, on one batch of noise in eval mode:
the distribution of the pre-normalization activations of a few channels, the Gaussian
mixture over it (an MN layer's own running GMM; for a BN layer a K-component GMM fitted with
MN's EM code, i.e. what BN's single Gaussian ignores), and the normalized output. One PNG per
layer, plus skewness / excess kurtosis (non-Gaussianity), mixture weights and the mixture's
mode overlap (mode_overlap: do the components separate modes?) per layer.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from models import mixture_core as core
from models.mixture_core import GMM
from models.mixture_norm import MixtureNorm

# Every BN flavour (1d/2d/3d, SyncBatchNorm) and every MN flavour.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, MixtureNorm)


def _samples(t: Tensor) -> Tensor:
    """(N, C, *) -> (M, C): one row per sample, as both norms see them."""
    return t.detach().float().movedim(1, -1).reshape(-1, t.shape[1]).cpu()


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel skewness and excess kurtosis of the rows of x (M, C), and a mask of the
    channels where they are defined (non-constant)."""
    x = x.double()
    d = x - x.mean(0)
    var = d.square().mean(0)
    valid = var > 1e-12 * (1.0 + x.abs().amax(0).square())
    safe = torch.where(valid, var, torch.ones_like(var))
    skew = d.pow(3).mean(0) / safe.pow(1.5)
    kurt = d.pow(4).mean(0) / safe.square() - 3.0
    return torch.where(valid, skew, 0.0), torch.where(valid, kurt, 0.0), valid


def mode_overlap(gmm: GMM) -> float | None:
    """How much a mixture's components overlap, channel by channel: 0 when every pair of components
    is separated in every channel, 1 when the components are identical. None for K = 1.

    For channel c and components j, k, with 1-D marginals N(mu_jc, s_jc) and N(mu_kc, s_kc), the
    Bhattacharyya coefficient (the integral of sqrt(p_j p_k), 1 for identical densities, ~0 for
    disjoint ones) is
        BC_jkc = sqrt(2 sqrt(s_jc s_kc) / (s_jc + s_kc)) * exp(-(mu_jc - mu_kc)^2 / (4 (s_jc + s_kc))).
    Channel c's overlap averages it over the pairs j < k, weighted by lam_j lam_k (the chance that
    two samples come from j and k, so a nearly dead component has little say):
        overlap_c = sum_{j<k} lam_j lam_k BC_jkc / sum_{j<k} lam_j lam_k,
    with per-channel weights lam_jc for a per-channel mixture. The layer's figure is the mean of
    overlap_c over channels. Marginals, not the C-dimensional components: in a wide layer two
    diagonal Gaussians are nearly disjoint as soon as a few channels differ, which says nothing
    about whether each channel's modes are separated.
    """
    lam, mu, s2 = (t.detach().double().cpu() for t in gmm)
    k = mu.shape[0]
    if k < 2:
        return None
    lam = lam[:, None].expand_as(mu) if lam.dim() == 1 else lam  # (K, C)
    j, i = torch.triu_indices(k, k, offset=1)
    ssum = s2[j] + s2[i]
    bc = torch.sqrt(2.0 * torch.sqrt(s2[j] * s2[i]) / ssum) * torch.exp(-(mu[j] - mu[i]) ** 2 / (4.0 * ssum))
    w = lam[j] * lam[i]  # (pairs, C)
    per_channel = (w * bc).sum(0) / w.sum(0).clamp_min(1e-300)
    return float(per_channel.mean())


def _mean_weights(lam: Tensor) -> list[float]:
    """The mixture weights for the report: lam itself (K,); for per-channel weights (K, C), each
    channel's sorted in decreasing order, then averaged over channels (labels are per channel)."""
    lam = lam.detach().double().cpu()
    if lam.dim() == 2:
        lam = lam.sort(0, descending=True).values.mean(1)
    return [round(float(v), 4) for v in lam]


@torch.no_grad()
def fit_gmm(x: Tensor, num_components: int = 3, iters: int = 20, var_floor: float = 1e-4, eps: float = 1e-5,
            max_samples: int | None = None) -> GMM:
    """A joint GMM fitted to the rows of x (M, C) as an MN layer's first step fits one (models/mixture_core.py):
    k-means++ seeding, then `iters` EM iterations, with the same floors and guards; lam is (K,). At most
    max_samples random rows."""
    x = x.detach()
    x = x.double() if x.dtype == torch.float64 else x.float()
    if max_samples is not None and x.shape[0] > max_samples:
        x = x[torch.randint(x.shape[0], (max_samples,), device=x.device)]
    shift = x.mean(0)
    o = core.Options(num_components, 1, eps, 0, x.shape[0], 0, 1e-2, var_floor, True, True, 1, False)
    seeds = core.seed(x - shift, o, core.identity, core.identity)
    gmm, _ = core.em(core.features(x - shift, 1), seeds, iters, o, core.identity)
    return GMM(gmm.lam[:, 0], gmm.mu + shift, gmm.sigma2)


def _layer_gmm(layer: nn.Module, pre: Tensor, num_components: int) -> GMM:
    if isinstance(layer, MixtureNorm):
        if layer.track_running_stats:  # what eval mode uses
            return GMM(layer.running_lambda, layer.running_mu, layer.running_sigma2)
        return GMM(layer.gmm_lambda, layer.gmm_mu, layer.gmm_sigma2)
    return fit_gmm(pre, num_components, iters=30, max_samples=16384)


def _plot(path: Path, title: str, pre: Tensor, post: Tensor, gmm: GMM, chans: list[int],
          skew: Tensor, kurt: Tensor) -> None:
    # Object-oriented matplotlib with the Agg canvas: no pyplot state, no backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lam, mu, sigma2 = (t.detach().double().cpu() for t in gmm)
    fig = Figure(figsize=(10, 2.4 * len(chans) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(chans), 2, squeeze=False)
    for row, c in enumerate(chans):
        x = pre[:, c].double()
        ax = axes[row][0]
        ax.hist(x.numpy(), bins=60, density=True, color="0.75")
        lo, hi = x.min().item(), x.max().item()
        pad = 0.1 * (hi - lo) + 1e-6
        grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
        total = torch.zeros_like(grid)
        lam_c = lam[:, c] if lam.dim() == 2 else lam  # per-channel mixtures: channel c's weights
        for k in range(len(lam_c)):  # K curves for a plot: a loop is clearer than broadcasting
            pdf = lam_c[k] * torch.exp(-0.5 * (grid - mu[k, c]) ** 2 / sigma2[k, c]) / torch.sqrt(
                2 * math.pi * sigma2[k, c])
            total += pdf
            ax.plot(grid.numpy(), pdf.numpy(), lw=1.2, label=f"k={k} (λ={lam_c[k]:.2f})")
        ax.plot(grid.numpy(), total.numpy(), "k--", lw=1, label="mixture")
        ax.set_title(f"ch {c} before norm: skew {skew[c]:.2f}, excess kurtosis {kurt[c]:.2f}", fontsize=9)
        ax.legend(fontsize=7)
        ax2 = axes[row][1]
        ax2.hist(post[:, c].numpy(), bins=60, density=True, color="tab:blue", alpha=0.7)
        ax2.set_title(f"ch {c} after norm", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


@torch.no_grad()
def diagnose(generator: nn.Module, z_dim: int, out_dir: Path, device, num_samples: int = 256,
             channels: int = 4, seed: int = 0, num_components: int = 3) -> list[dict]:
    """Hooks every norm layer of `generator`, runs generator(z) for z ~ N(0, I) of shape
    (num_samples, z_dim) in eval mode, and writes out_dir/layerNN_<name>.png per layer.

    Plots the `channels` channels with the most skewed pre-norm activations. Returns one dict
    per layer: index, name, kind ("bn"/"mn"), num_features, skewness and excess_kurtosis
    (pre-norm, averaged over non-constant channels), mixture_weights (_mean_weights),
    mode_overlap (see there; None for K = 1), channels, png.
    Reproducible for a given seed; the caller's RNG state is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    layers = [(name, m) for name, m in generator.named_modules() if isinstance(m, NORM_LAYERS)]
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: captured.__setitem__(name, (_samples(inp[0]), _samples(out))))
        for name, m in layers]
    was_training = generator.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            generator.eval()
            generator(torch.randn(num_samples, z_dim).to(device))
            rows = []
            for idx, (name, layer) in enumerate(layers):
                if name not in captured:  # a layer the forward pass never reached
                    continue
                pre, post = captured[name]
                skew, kurt, valid = channel_moments(pre)
                gmm = _layer_gmm(layer, pre, num_components)
                order = torch.argsort(skew.abs() * valid, descending=True)
                chans = sorted(order[: min(channels, pre.shape[1])].tolist())
                kind = "mn" if isinstance(layer, MixtureNorm) else "bn"
                safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "norm"
                png = out_dir / f"layer{idx:02d}_{safe}.png"
                title = f"{name} ({type(layer).__name__}; mixture: {'running GMM' if kind == 'mn' else f'K={num_components} GMM fitted by EM'})"
                _plot(png, title, pre, post, gmm, chans, skew, kurt)
                n_valid = int(valid.sum())
                rows.append({
                    "index": idx, "name": name, "kind": kind, "num_features": pre.shape[1],
                    "skewness": float(skew[valid].mean()) if n_valid else 0.0,
                    "excess_kurtosis": float(kurt[valid].mean()) if n_valid else 0.0,
                    "mixture_weights": _mean_weights(gmm.lam),
                    "mode_overlap": mode_overlap(gmm),
                    "channels": chans, "png": str(png),
                })
    finally:
        for h in hooks:
            h.remove()
        generator.train(was_training)
    return rows


def format_report(rows: list[dict]) -> str:
    """A plain-text table of diagnose()'s rows."""
    head = f"{'#':>2}  {'layer':<24} {'kind':<4} {'C':>5} {'skew':>7} {'ex.kurt':>8} {'overlap':>7}  mixture weights"
    lines = [head, "-" * len(head)]
    for r in rows:
        weights = " ".join(f"{w:.2f}" for w in r["mixture_weights"])
        overlap = "-" if r["mode_overlap"] is None else f"{r['mode_overlap']:.3f}"
        lines.append(f"{r['index']:>2}  {r['name'][:24]:<24} {r['kind']:<4} {r['num_features']:>5} "
                     f"{r['skewness']:>7.2f} {r['excess_kurtosis']:>8.2f} {overlap:>7}  {weights}")
    lines.append("skew/ex.kurt: of the pre-norm activations, averaged over channels (0 for a Gaussian). "
                 "Weights: MN's running GMM; for BN a GMM fitted to what BN normalizes.")
    lines.append("overlap: the mixture's mode overlap, the lambda-weighted mean Bhattacharyya coefficient of "
                 "pairs of components per channel, averaged over channels (0 = modes separated, 1 = identical "
                 "components).")
    return "\n".join(lines)
