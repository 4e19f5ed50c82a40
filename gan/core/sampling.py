"""Images from a generator: fixed-noise sampling, and [-1, 1] floats to the uint8 pixels metrics take."""
from __future__ import annotations

import copy

import torch

from gan.core.data import IMAGE_SIZE


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, the form real images and the Inception network use."""
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(G: torch.nn.Module, num: int, z_dim: int, seed: int, device: torch.device,
             batch_size: int = 500, g_mode: str = "eval", start: int = 0, stop: int | None = None) -> torch.Tensor:
    """`num` images in [-1, 1] from fixed noise; the caller's RNG streams and G are left untouched.

    start/stop: only images [start, stop) of those `num` (one process's share); with start a multiple
    of batch_size they come from the same forward batches, so the same pixels, as in the full call.
    """
    if g_mode == "train":
        G = copy.deepcopy(G)  # batch statistics without touching the real model's running state
    was_training = G.training
    G.train(g_mode == "train")
    stop = num if stop is None else stop
    z = torch.randn(num, z_dim, generator=torch.Generator().manual_seed(seed))[start:stop].to(device)
    forked = [device.index or 0] if device.type == "cuda" else []
    # Eagerly, even when G was compiled for training: sampling's batch size, grad mode and (eval) code path
    # would each compile G again, for a few forwards that cost little next to Inception's.
    with torch.random.fork_rng(devices=forked), torch.compiler.set_stance("force_eager"):  # EM draws from the global RNG
        out = [G(z[i:i + batch_size]).float() for i in range(0, len(z), batch_size)]
    G.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
