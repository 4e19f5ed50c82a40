"""MN's numbers, pinned: 20 float64 training steps of a small MN GAN give the losses and MN buffers recorded
in tests/fixtures/mn-20-steps.pt, to 1e-9, for the default options, per-channel posteriors and fresh fits.

A change to how MN is computed (a refactor, a faster path) must leave these numbers alone; a change to what MN
computes re-records them, and says why, with `python -m tests.test_mn_fixture --record`.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

from gan.core.config import load_config
from gan.core.data import ImageData
from gan.core.train import Trainer
from tests.cli_float64 import float64_mode

FIXTURE = Path(__file__).parent / "fixtures" / "mn-20-steps.pt"
STEPS = 20
VARIANTS = {"defaults": {}, "per_channel": {"model.mn.posteriors": "per_channel"}, "fresh": {"model.mn.fit": "fresh"}}
LOSSES = ("loss_d", "loss_g", "d_real", "d_fake")


def run(variant: str) -> dict[str, torch.Tensor]:
    """The losses of every step and the generator's MN buffers after the last one."""
    g = torch.Generator().manual_seed(0)
    # Integer pixels from torch's generator: the same on every processor (no float rounding before the run).
    data = ImageData(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.zeros(64, dtype=torch.int64), ["x"], "mn-fixture")
    with tempfile.TemporaryDirectory() as tmp, float64_mode():
        cfg = load_config(None, {"run_dir": str(Path(tmp) / "run"), "model.norm": "mn", "model.ngf": 8,
                                 "model.ndf": 8, "model.z_dim": 16, "train.batch_size": 16, "train.device": "cpu",
                                 "train.steps": STEPS, "eval.every": 0, "log.sample_every": 0, "ckpt.every": 0,
                                 "log.wandb": "disabled", **VARIANTS[variant]})
        trainer = Trainer(cfg, progress=False, wandb_mode="disabled", data=data)
        losses = []
        for _ in range(STEPS):
            scalars = trainer.train_step()
            trainer.step += 1
            losses.append(torch.stack([scalars[k].detach() for k in LOSSES]))
        trainer.logger.close()
        mn_buffers = {f"G.{name}": b.clone() for name, b in trainer.G.named_buffers()
                      if ".gmm_" in name or ".running_" in name or name.endswith("dead_count")}
    return {"losses": torch.stack(losses), **mn_buffers}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_twenty_float64_steps_give_the_recorded_numbers(variant):
    recorded = torch.load(FIXTURE, weights_only=True)[variant]
    now = run(variant)
    assert now.keys() == recorded.keys()
    assert len([k for k in now if ".gmm_mu" in k]) == 3  # the three MN layers' mixtures are compared
    for key in recorded:
        torch.testing.assert_close(now[key], recorded[key], rtol=0, atol=1e-9, msg=lambda m: f"{key}: {m}")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save({v: run(v) for v in VARIANTS}, FIXTURE)
    print(f"recorded {FIXTURE}")
