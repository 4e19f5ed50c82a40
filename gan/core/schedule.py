"""When things happen in the training loop: what is due after a step, and the window of losses and
step times that each logged step reports."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gan.core import distributed
from gan.core.config import Config


@dataclass(frozen=True)
class Due:
    """What is due after a step: one line per schedule (config keys log.every, eval.every and eval.at,
    log.sample_every, ckpt.every; 0 turns one off). The last step logs, evaluates (if evaluation is on), samples
    and saves; with ckpt.keep_evaluated every evaluation step saves too."""
    log: bool
    evaluate: bool
    sample: bool
    checkpoint: bool

    @classmethod
    def at(cls, step: int, cfg: Config) -> "Due":
        last = step == cfg.train.steps

        def every(n: int) -> bool:
            return n > 0 and step % n == 0
        evaluate = cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step in cfg.eval.at or last)
        checkpoint = every(cfg.ckpt.every) or last or (evaluate and cfg.ckpt.keep_evaluated)
        return cls(log=every(cfg.log.every) or checkpoint,  # a checkpoint's step has its losses logged
                   evaluate=evaluate,
                   sample=every(cfg.log.sample_every) or last,
                   checkpoint=checkpoint)


class Window:
    """Losses and step time summed since the last logged step, kept on the device (no host sync per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.time = 0, 0.0

    def add(self, scalars: dict | None, seconds: float) -> None:
        for k, v in (scalars or {}).items():  # None: on_nan skip refused this step's update
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1
        self.time += seconds

    def flush(self, train_time: float) -> dict:
        """The window's means (the losses of the global batch: the mean over ranks of each rank's mean)."""
        record: dict = {}
        if self.sums:
            keys = list(self.sums)
            values = distributed.mean_over_ranks(torch.stack([self.sums[k] for k in keys])) / self.steps
            record.update(zip(keys, values.tolist()))
        record["sec_per_step"] = self.time / self.steps
        record["train_time"] = train_time
        self.__init__()
        return record
