"""On a CPU, a config sized for a GPU can take many hours, most of them in evaluation (Inception at 299x299).
After the first steps of a run, this says once how long it is expected to take, evaluations included, when
that is more than LONG_S, and names the config that finishes in minutes."""
from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from gan.core.config import Config
from gan.core.sampling import generate, to_uint8

LONG_S = 30 * 60
QUICK_COMMAND = "python cli.py train --config configs/cpu-quick.yaml"
# Steps not timed: the first fits MN's mixtures (and under train.compile, the second compiles).
WARMUP_STEPS, TIMED_STEPS = 2, 5
# No CPU scores an image faster: Inception v3 at 299x299 is about 11.5 GFLOP per image, so 5 ms would take
# over 2 TFLOP/s. Below this bound's estimate, nothing is measured and nothing is said.
MIN_SEC_PER_IMAGE = 0.005
CIFAR10_TEST_IMAGES = 10_000


def evaluations_between(start: int, steps: int, every: int, at: list[int] | tuple = ()) -> int:
    """Evaluations after steps start+1..steps: every `every` steps, at the steps `at` and at the last step
    (as schedule.Due)."""
    if every <= 0 or steps <= start:
        return 0
    others = {s for s in (*at, steps) if start < s <= steps and s % every}
    return steps // every - start // every + len(others)


def expected_seconds(steps_left: int, sec_per_step: float, evaluations: int, samples_per_eval: int,
                     reference_images: int, sec_per_image: float) -> dict[str, float]:
    """The run's expected time in parts: training, evaluations (generation and Inception per image), and the
    reference statistics (the real images through Inception once; 0 when they are cached)."""
    parts = {"train": steps_left * sec_per_step,
             "evaluations": evaluations * samples_per_eval * sec_per_image,
             "reference": reference_images * sec_per_image}
    parts["total"] = sum(parts.values())
    return parts


def reference_images(cfg: Config, train_images: int) -> int:
    """How many real images the reference statistics take (eval.reference, eval.reference_samples); 0 when
    unknown before reading them (a folder of images)."""
    ref, cap = cfg.eval.reference, cfg.eval.reference_samples
    n = {"train": train_images, "test": CIFAR10_TEST_IMAGES}.get(ref, cap)
    return min(n, cap) if cap else n


def hours_minutes(seconds: float) -> str:
    """"6 h 32 min", "12 min", "40 s"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"


def message(parts: dict[str, float], sec_per_step: float, evaluations: int, samples_per_eval: int,
            reference: int, sec_per_image: float) -> str:
    what = [f"training {hours_minutes(parts['train'])} at {sec_per_step:.3f} s/step"]
    if evaluations:
        what.append(f"{evaluations} evaluations of {samples_per_eval} samples {hours_minutes(parts['evaluations'])}")
    if parts["reference"]:
        what.append(f"the statistics of {reference} reference images {hours_minutes(parts['reference'])}")
    per_image = f", at {sec_per_image:.3f} s per image" if evaluations or parts["reference"] else ""
    return (f"expected time on this CPU: about {hours_minutes(parts['total'])} ({'; '.join(what)}{per_image}). "
            f"This config is sized for a GPU; one that finishes in minutes on a CPU: {QUICK_COMMAND}")


@torch.no_grad()
def eval_seconds_per_image(G: torch.nn.Module, evaluator, z_dim: int, device: torch.device, g_mode: str,
                           n: int = 32) -> float:
    """Seconds to generate and score one image: one batch of `n` through G and Inception, timed after a
    first batch that loads the network."""
    def batch(seed: int) -> None:
        evaluator.inception_outputs(to_uint8(generate(G, n, z_dim, seed, device, n, g_mode)))
    batch(0)
    t0 = time.perf_counter()
    batch(1)
    return (time.perf_counter() - t0) / n


class CpuEta:
    """Fed each step's seconds by the training loop; after WARMUP_STEPS + TIMED_STEPS, says the expected time
    once if it is long. Used for one process on a CPU (trainer.device.type == "cpu", trainer.world == 1)."""

    def __init__(self, trainer):
        self.trainer, self.start = trainer, trainer.step
        self.seen, self.timed = 0, 0.0

    def add(self, seconds: float) -> None:
        self.seen += 1
        if self.seen > WARMUP_STEPS:
            self.timed += seconds
        if self.seen == WARMUP_STEPS + TIMED_STEPS:
            line = self.estimate(self.timed / TIMED_STEPS)
            if line:
                tqdm.write(line, file=sys.stderr)

    def estimate(self, sec_per_step: float) -> str | None:
        t, cfg = self.trainer, self.trainer.cfg
        steps_left = cfg.train.steps - self.start
        evals = evaluations_between(self.start, cfg.train.steps, cfg.eval.every, cfg.eval.at)
        samples = cfg.eval.num_samples
        if expected_seconds(steps_left, sec_per_step, evals, samples, 0, MIN_SEC_PER_IMAGE)["total"] <= LONG_S:
            return None
        reference, per_image = 0, 0.0
        if evals:
            ev = t.evaluator or t.make_evaluator(cfg, t.device, lambda: t.data, t.progress)
            t.evaluator = ev  # the run's evaluations use it: the network stays loaded
            per_image = eval_seconds_per_image(t.sampler, ev, cfg.model.z_dim, t.device, cfg.eval.g_mode,
                                               min(32, cfg.eval.batch_size))
            if not os.path.isfile(ev.reference_cache_path):
                reference = reference_images(cfg, len(t.data.images))
        parts = expected_seconds(steps_left, sec_per_step, evals, samples, reference, per_image)
        if parts["total"] <= LONG_S:
            return None
        return message(parts, sec_per_step, evals, samples, reference, per_image)
