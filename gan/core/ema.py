"""The generator's exponential moving average (train.ema_decay), updated without a host sync."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    """torch's AveragedModel with an EMA average, so that checkpoints keep its state_dict ("module.*" and
    "n_averaged"), and the same arithmetic: the first update copies the weights, each later one is
    ema += (1 - decay) * (weights - ema). AveragedModel's own update reads its device-side counter
    on the host twice per call; here whether it has started is known on the host. Buffers (BN's running
    statistics, MN's running mixture) are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.started = False

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.started = bool(self.n_averaged > 0)  # once, at restore
        return result

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        if self.started:
            self.multi_avg_fn(averaged, current, self.n_averaged)
        else:
            torch._foreach_copy_(averaged, current)
            self.started = True
        self.n_averaged += 1
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
