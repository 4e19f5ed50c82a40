"""One training step: the discriminator's update(s), then the generator's, with no host sync (on_nan: skip
aside), eager or compiled. The Trainer owns the models, optimizers and random streams (and checkpoints
them); this module owns what a step does with them."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from gan.core import device as accel
from gan.core import distributed
from gan.core.config import Config


class GanStep:
    """`gan_step(step)`: training step number `step + 1` (0-based `step` done so far); returns device
    scalars for logging, or None when `on_nan: skip` refused an update.

    g_train/d_train are the modules that train: DDP wrappers under torchrun, else G and D themselves.
    `first_bad` is the first step whose loss or gradient was not finite (-1: none), kept on the device so
    that the hot loop never syncs; the Trainer reads it when it logs, evaluates or saves."""

    def __init__(self, cfg: Config, G: torch.nn.Module, D: torch.nn.Module, g_train: torch.nn.Module,
                 d_train: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                 scalers: dict[str, torch.amp.GradScaler], amp: torch.dtype | None, ema, stream, noise: torch.Generator,
                 device: torch.device, z_rows: slice, is_main: bool):
        self.cfg = cfg
        self.G, self.D, self.g_train, self.d_train = G, D, g_train, d_train
        self.opt_g, self.opt_d, self.scalers, self.amp, self.ema = opt_g, opt_d, scalers, amp, ema
        self.stream, self.noise, self.device, self.z_rows, self.is_main = stream, noise, device, z_rows, is_main
        self.first_bad = torch.tensor(-1, device=device)
        # The number of the step being taken, on the device too (set by a fill, not copied from the host).
        self._step_now = torch.zeros((), dtype=torch.int64, device=device)
        self._step = 0
        self._skipped = False  # on_nan skip: whether this step refused an update
        # Under train.compile the first step of a process runs eagerly: it fits MN's first mixtures
        # (or reads `initialized` from a checkpoint), which needs a host sync that would break the graph
        # and make every MN layer's code compile again for its own width. Compiled steps follow.
        self._compiled = cfg.train.compile
        self._eager_steps_left = 1 if cfg.train.compile else 0

    def __call__(self, step: int) -> dict | None:
        if self._compiled:
            # Every compiled step one CUDA graph generation, whatever the order of forwards and backwards
            # inside it (gan/core/device.py, begin_compiled_step, says why).
            accel.begin_compiled_step()
        if self._eager_steps_left:
            self._eager_steps_left -= 1
            with accel.eager():
                return self._run(step)
        return self._run(step)

    def _run(self, step: int) -> dict | None:
        cfg = self.cfg.train
        self._step, self._skipped = step, False
        self._step_now.fill_(step + 1)
        for j in range(cfg.d_steps):
            real = self.stream.batch(step * cfg.d_steps + j)
            if cfg.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            # The global batch's noise, the same on every rank; this rank's rows of it.
            z = torch.randn(cfg.batch_size, self.cfg.model.z_dim, device=self.device,
                            generator=self.noise)[self.z_rows]
            # The last discriminator step's fakes are reused for the generator step, as in the DCGAN example.
            fake, loss_d, d_real, d_fake = self._d_step(real, z)
        loss_g = self._g_step(fake)
        if self._skipped:
            return None
        if self.ema is not None:
            self.ema.update_parameters(self.G)
        # Computed now, inside the step: d_real and d_fake may be outputs of CUDA graphs, which the next
        # step's graphs overwrite; these means (and the losses) are tensors of their own.
        return {"loss_d": loss_d, "loss_g": loss_g,
                "d_real": torch.sigmoid(d_real).mean(), "d_fake": torch.sigmoid(d_fake).mean()}

    def _autocast(self):
        return accel.autocast(self.device, self.amp)

    def _d_step(self, real: torch.Tensor, z: torch.Tensor):
        with self._autocast():
            fake = self.g_train(z)
            # Two forwards (BN sees real and fake batches apart, as in the DCGAN example), one backward:
            # DDP's hooks fire once per parameter with the sum of both uses' gradients.
            d_real = loss_precision(self.d_train(real))
            d_fake = loss_precision(self.d_train(fake.detach()))
            # Non-saturating GAN loss; softplus(-x) is BCE-with-logits against 1, softplus(x) against 0.
            loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        self._apply(self.opt_d, self.D, loss_d, self.scalers["d"])
        return fake, loss_d.detach(), d_real.detach(), d_fake.detach()

    def _g_step(self, fake: torch.Tensor):
        # D itself, not its DDP wrapper, with its weights frozen: G's loss needs only the path through D to
        # G's output, so D's weight gradients (and averaging them over ranks) would be work thrown away.
        # Its synchronized BN still normalizes with global statistics.
        with frozen(self.D), self._autocast():
            loss_g = F.softplus(-loss_precision(self.D(fake))).mean()
        self._apply(self.opt_g, self.G, loss_g, self.scalers["g"])
        return loss_g.detach()

    def _apply(self, opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor,
               scaler: torch.amp.GradScaler) -> None:
        # set_to_none: a gradient is a fresh tensor each step, never one accumulated into (under CUDA graphs
        # the previous step's gradients live in memory that this step's graphs reuse).
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        finite = torch.isfinite(loss)
        if not scaler.is_enabled():
            # Under fp16 loss scaling, inf gradients are routine overflow: the scaler skips that
            # update and lowers its scale by itself, so only the loss says the run diverged.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if self.cfg.train.on_nan == "skip":
            # This mode pays a host sync per update to keep a bad batch out of the weights;
            # under torchrun the ranks agree, so that all of them skip the update or none does.
            if not distributed.all_true(bool(finite.item())):
                if not self._skipped and self.is_main:  # one line per step (D and G may both skip)
                    print(f"warning: non-finite loss or gradient at step {self._step + 1}; update skipped",
                          file=sys.stderr)
                opt.zero_grad(set_to_none=True)
                self._skipped = True
                return
        else:
            self.first_bad = torch.where(finite | (self.first_bad >= 0), self.first_bad, self._step_now)
        scaler.step(opt)
        scaler.update()


@contextmanager
def frozen(module: torch.nn.Module):
    """The module's trainable parameters do not require grad inside the block."""
    trained = [p for p in module.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trained:
            p.requires_grad_(True)


def loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """D's logits in at least float32 for the loss: AMP's bf16/fp16 logits are upcast; float32 and
    float64 (the tests' exact-arithmetic runs) stay as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
