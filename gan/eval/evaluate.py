"""Metrics of a trained generator from its checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from gan.core.checkpoint import CheckpointError
from gan.core.config import Config, config_from_dict
from gan.core.errors import UserError
from gan.core.run_folder import load_run_or_checkpoint
from models.dcgan import build_models


def load_generator(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, Config, dict]:
    """The generator a checkpoint samples from (its EMA copy when the run kept one), in eval mode."""
    state = load_run_or_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(state["config"])
    except UserError as e:
        raise CheckpointError(f"{checkpoint}: its config is not valid here: {e}") from None
    G, _ = build_models(cfg)
    weights = state["G"]
    if state.get("ema"):
        # AveragedModel keeps the copy under "module." beside its own counter.
        weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    try:
        G.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not fit its own config's generator: "
                              f"{str(e).splitlines()[0]}") from None
    return G.to(device).eval(), cfg, state


def evaluate_checkpoint(checkpoint: str, num_samples: int | None, device_name: str, reference: str | None,
                        grid: str | None, g_mode: str | None = None, progress: bool = True,
                        extras: Sequence[str] = ()) -> dict:
    """The checkpoint's generator scored as its run's config says, with `extras` (metrics.<key> of
    gan/eval/extras.py, e.g. "fd_dinov2") turned on besides."""
    from torchvision.utils import save_image

    from gan.core.device import resolve_device
    from gan.core.sampling import generate, to_uint8
    from gan.core.tracking import image_grid
    from gan.eval.metrics import Evaluator

    device = resolve_device(device_name)
    G, cfg, state = load_generator(checkpoint, device)
    if reference:
        cfg.eval.reference = reference
    if g_mode:
        cfg.eval.g_mode = g_mode
    for key in extras:
        setattr(cfg.metrics, key, True)
    n = cfg.eval.num_samples if num_samples is None else num_samples
    if n < 2:
        raise UserError("--num-samples must be at least 2")
    images = generate(G, n, cfg.model.z_dim, cfg.eval.seed, device, cfg.eval.batch_size, cfg.eval.g_mode)
    if grid:
        save_image(image_grid(images[:64]).float() / 255, grid)
    evaluator = Evaluator.from_config(cfg, device, progress=progress)
    result = {k: v if isinstance(v, int) else float(v) for k, v in evaluator.score(to_uint8(images)).items()}
    return {"checkpoint": str(checkpoint), "step": state["step"], "norm": cfg.model.norm,
            "generator": "ema" if state.get("ema") else "raw", "g_mode": cfg.eval.g_mode, "num_samples": n, **result}
