"""The training loop: one class that owns the models, the loop, checkpoints, evaluation and logging."""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from gan.core import checkpoint as ckpt
from gan.core import device as accel
from gan.core import distributed
from gan.core.config import Config
from gan.core.data import BatchStream, ImageData, load_dataset
from gan.core.ema import EMA
from gan.core.eta import CpuEta
from gan.core.errors import Diverged, Interrupted, UserError
from gan.core.run_folder import RunFolder
from gan.core.sampling import generate, to_uint8
from gan.core.schedule import Due, Window
from gan.core.step import GanStep
from gan.core.tracking import RunLogger
from models.dcgan import build_models
from models.sync_norms import local_norms, sync_norms


# The noise z comes from its own generator, seeded from train.seed, so that N processes draw the same
# global batch of z (each uses its rows) and MN's draws from the global RNG do not shift it.
NOISE_SEED_OFFSET = 1_000_003


class Trainer:
    """make_evaluator(cfg, device, train_data, progress) -> the evaluator that scores the generator (FID/KID);
    required when cfg.eval.every > 0. gan/core stays below gan/eval, so the caller chooses it (the CLI passes
    gan.eval.metrics.Evaluator.from_config); `train_data` returns the training images already in memory."""

    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False,
                 wandb_mode: str | None = None, progress: bool = True, data: ImageData | None = None,
                 make_evaluator: Callable | None = None):
        from gan.core.tracking import NullLogger, resolve_wandb_mode
        if cfg.eval.every > 0 and make_evaluator is None:
            raise UserError(f"eval.every is {cfg.eval.every} but no evaluator was given to the Trainer "
                            f"(make_evaluator, e.g. gan.eval.metrics.Evaluator.from_config); or set eval.every 0")
        self.cfg = cfg
        self.make_evaluator = make_evaluator
        # Under torchrun (gan/core/distributed.py): this process's rank of `world`; rank 0 alone writes files.
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.device = distributed.local_device(accel.resolve_device(cfg.train.device))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.folder = RunFolder(cfg.resolved_run_dir)
        self.run_dir, self.ckpt_dir = self.folder.path, self.folder.ckpt_dir
        distributed.check_same_config(cfg.to_dict())
        # Rank 0 checks and prepares the run folder and reads the checkpoint; every rank gets its state.
        state = distributed.on_main(lambda: self.folder.prepare(cfg, resume, overwrite))

        torch.manual_seed(cfg.train.seed)
        # `data` lets benchmarks and tests hand over images that are already in memory.
        self.data = data or load_dataset(cfg.data.source, cfg.data.path, cfg.data.split, cfg.data.download,
                                         cfg.data.resize, self.progress)
        images = self.data.images.to(self.device) if cfg.data.on_device else self.data.images
        self.stream = BatchStream(images, cfg.train.batch_size, cfg.train.seed, cfg.data.hflip, self.device,
                                  self.rank, self.world)

        self.G, self.D = build_models(cfg)
        if self.world > 1 and cfg.model.sync_norm:
            # Both networks: D's BN must see the global batch too for N processes to equal one.
            sync_norms(self.G)
            sync_norms(self.D)
        self.G.to(self.device)
        self.D.to(self.device)
        if cfg.train.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        t = cfg.train
        fused = accel.use_fused_adam(t.fused_adam, self.device)
        self.opt_g = accel.adam(self.G.parameters(), t.lr_g, (t.beta1, t.beta2), fused)
        self.opt_d = accel.adam(self.D.parameters(), t.lr_d, (t.beta1, t.beta2), fused)
        self.amp = accel.amp_dtype(t.amp, self.device)
        # fp16 loss scaling: one scaler per optimizer, each updated right after its own step, so that any number
        # of D steps per G step is one step() per update() (what GradScaler requires).
        self.scalers = {name: torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
                        for name in ("d", "g")}
        self.ema = EMA(self.G, t.ema_decay) if t.ema_decay > 0 else None
        if t.compile:
            accel.compile_in_place((self.G, self.D), t.compile_mode)
        self.noise = torch.Generator(self.device).manual_seed(cfg.train.seed + NOISE_SEED_OFFSET)

        self.step = 0
        self.train_time = 0.0
        self.history: list[dict] = []
        self.best: dict | None = None
        if state is not None:
            self._restore(state)
        # The modules that train: DDP wrappers (gradients averaged over ranks) under torchrun, else G and D.
        # Synchronized norms keep buffers equal on every rank, so DDP need not broadcast them.
        g_train = distributed.wrap(self.G, self.device, broadcast_buffers=not cfg.model.sync_norm)
        d_train = distributed.wrap(self.D, self.device, broadcast_buffers=not cfg.model.sync_norm)
        per_rank = cfg.train.batch_size // self.world
        self.gan_step = GanStep(cfg, self.G, self.D, g_train, d_train, self.opt_g, self.opt_d, self.scalers,
                                self.amp, self.ema, self.stream, self.noise, self.device,
                                slice(self.rank * per_rank, (self.rank + 1) * per_rank), self.is_main)
        self.fixed_z_seed = cfg.train.seed + 10_007
        self.evaluator = None
        if self.is_main:
            mode, why = resolve_wandb_mode(wandb_mode, cfg.log.wandb)
            if self.progress or mode != "disabled":
                print(f"wandb: {mode} ({why})", file=sys.stderr)
            self.logger = RunLogger(self.folder, cfg.to_dict(), mode, cfg.log.wandb_project,
                                    self.step if state is not None else None)
        else:
            self.logger = NullLogger()
        self._stop_signal: int | None = None
        self._signal_time = 0.0

    # ------------------------------------------------------------------ checkpoint state

    def _restore(self, state: dict) -> None:
        try:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"checkpoint does not fit these models: {str(e).splitlines()[0]}") from None
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            saved = state["scaler"]
            per_optimizer = set(saved) == {"d", "g"}  # else one scaler's state, for both optimizers
            for name, scaler in self.scalers.items():
                scaler.load_state_dict(saved[name] if per_optimizer else saved)
        self.step = state["step"]
        self.train_time = state.get("train_time", 0.0)
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        # Under torchrun every rank restores rank 0's RNG states (MN's EM subsampling uses the global one).
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        try:
            self.noise.set_state(state["rng"]["noise"])
        except (KeyError, RuntimeError):  # an older checkpoint, or one from another device type
            if self.is_main:
                print("warning: the checkpoint holds no noise stream for this device type (an older checkpoint, "
                      "or another device); noise continues from a fresh stream", file=sys.stderr)
            self.noise.manual_seed(self.cfg.train.seed + NOISE_SEED_OFFSET + self.step)

    def state_dict(self) -> dict:
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "step": self.step, "config": self.cfg.to_dict(),
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": ({name: s.state_dict() for name, s in self.scalers.items()}
                       if self.scalers["g"].is_enabled() else None),
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng, "noise": self.noise.get_state()},
            "history": self.history, "best": self.best, "train_time": self.train_time,
        }

    def save(self) -> Path:
        if not self.is_main:  # rank 0 writes for everyone
            return ckpt.step_path(self.ckpt_dir, self.step)
        cfg = self.cfg
        kept_for_good = lambda step: cfg.ckpt.keep_evaluated and Due.at(step, cfg).evaluate
        return ckpt.save_checkpoint(self.state_dict(), self.ckpt_dir, cfg.ckpt.keep, kept_for_good)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict | None:
        """One generator update after `d_steps` discriminator updates (gan/core/step.py); returns device
        scalars, or None when `on_nan: skip` refused an update."""
        return self.gan_step(self.step)

    # ------------------------------------------------------------------ sampling and evaluation

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator that samples and metrics come from: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.G

    def evaluate(self) -> dict:
        """FID/KID of the sampling generator. Under torchrun each rank makes and featurizes its share of the same
        fixed-noise samples (whole forward batches, so the same pixels as one process) and rank 0 scores the
        gathered features; Inception features match one process's up to the float rounding of differently
        composed batches. Every rank gets the result."""
        if self.evaluator is None:
            if self.make_evaluator is None:
                raise UserError("this Trainer was made without an evaluator (make_evaluator)")
            self.evaluator = self.make_evaluator(self.cfg, self.device, lambda: self.data, self.progress)
        e, z_dim = self.cfg.eval, self.cfg.model.z_dim
        first, last = distributed.share(math.ceil(e.num_samples / e.batch_size))
        start, stop = first * e.batch_size, min(last * e.batch_size, e.num_samples)
        with local_norms(self.sampler) as G:
            if e.g_mode == "train":
                # Batch statistics: each forward batch updates the sampling copy's state for the next one,
                # so every rank makes all of them (cheap next to Inception) and keeps its share.
                images = generate(G, e.num_samples, z_dim, e.seed, self.device, e.batch_size, e.g_mode)
                images = images[start:stop]
            else:
                images = generate(G, e.num_samples, z_dim, e.seed, self.device, e.batch_size, e.g_mode,
                                  start=start, stop=stop)
        ev = self.evaluator
        # One process keeps the features on the evaluation device, where FID and KID are computed; under
        # torchrun each rank's share goes to the host once, to be gathered on rank 0.
        part = ev.inception_outputs(to_uint8(images), on_device=self.world == 1) if len(images) else None
        parts = [p for p in distributed.gather_to_main(part) or [] if p is not None]

        def score() -> dict:
            if len(parts) == 1:  # no concatenation: it would copy the features once more
                return ev.score_features(*parts[0])
            return ev.score_features(*(_concat([p[i] for p in parts]) for i in range(len(parts[0]))))
        result = {k: v if isinstance(v, int) else float(v) for k, v in distributed.on_main(score).items()}
        result["ema"] = self.ema is not None
        return result

    def write_samples(self) -> Path | None:
        if not self.is_main:
            return None
        with local_norms(self.sampler) as G:  # rank 0 alone: no collectives
            images = generate(G, 64, self.cfg.model.z_dim, self.fixed_z_seed, self.device,
                              g_mode=self.cfg.eval.g_mode)
        caption = f"step {self.step}" + (" (EMA generator)" if self.ema is not None else "")
        return self.logger.samples(self.step, images, caption)

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self._stop_signal is not None:  # second Ctrl-C: the user means it
            if self.world > 1 and now - self._signal_time < 1.0:
                return  # torchrun passing on the same Ctrl-C the terminal already sent to every process
            raise KeyboardInterrupt
        self._stop_signal, self._signal_time = signum, now
        if self.is_main:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                  f"(press Ctrl-C again to quit at once)", file=sys.stderr)

    def run(self) -> dict:
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.logger.close()
            if self.world > 1:
                # DDP's reducers hold the process group. Freed later, after distributed.teardown(), the gloo
                # group's destructor could hang the process at exit (seen on torch 2.11, 1 run in 3).
                self.gan_step = None

    def _loop(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and cfg.log.sample_every:
            self.write_samples()
        window = Window()
        # One process on a CPU (not --quiet): a long run says how long, evaluations included, after its first steps.
        eta = CpuEta(self) if self.device.type == "cpu" and self.world == 1 and self.progress else None
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=self.run_dir.name, unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        self.G.train()
        self.D.train()
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            scalars = self.train_step()
            self.step += 1
            due = Due.at(self.step, cfg)
            if self.device.type == "cuda" and due.log:
                torch.cuda.synchronize(self.device)  # so that the window's time is the GPU's, not the launches'
            dt = time.perf_counter() - t0
            window.add(scalars, dt)
            self.train_time += dt
            bar.update(1)
            if eta is not None:
                eta.add(dt)
            # Under torchrun a signal reaches the processes at different steps: they agree on it here, so
            # that all stop after the same step. (One process: this is just the signal, if any.)
            stop = distributed.max_int(self._stop_signal or 0)
            if due.log or due.evaluate or stop:
                self._check_finite()  # nothing is saved or scored past here with weights a bad update touched
            record = window.flush(self.train_time) if due.log else {}
            if due.evaluate:
                record.update(self._evaluate_and_keep_best())
            if record:
                self._log(record, bar)
            if due.sample:
                self.write_samples()
            if due.checkpoint:
                self.save()
            if stop:
                bar.close()
                path = self.save() if not due.checkpoint else self._last_ckpt()
                # No process exits before rank 0's checkpoint is written: torchrun stops the whole job
                # as soon as one process ends with an error code.
                distributed.barrier()
                raise _shared(Interrupted(stop, self.step, path))
        bar.close()
        summary = {"step": self.step, "train_time": self.train_time, "run_dir": str(self.run_dir)}
        if self.best:
            summary.update(best_fid=self.best["fid"], best_step=self.best["step"])
        return summary

    def _evaluate_and_keep_best(self) -> dict:
        metrics = self.evaluate()
        self.history.append({"step": self.step, **metrics})
        if self.best is None or metrics["fid"] < self.best["fid"]:
            self.best = {"step": self.step, "fid": metrics["fid"]}
            self.logger.summary({"best_fid": self.best["fid"], "best_step": self.step})
            if self.is_main:
                ckpt.write_checkpoint(self.state_dict(), self.folder.best_path)
        return metrics

    def _log(self, record: dict, bar: tqdm) -> None:
        record.setdefault("train_time", self.train_time)
        self.logger.log(self.step, record)
        post = {k: f"{record[k]:.3f}" for k in ("loss_d", "loss_g") if k in record}
        fids = [h["fid"] for h in self.history if "fid" in h]
        if fids:
            post["fid"] = f"{fids[-1]:.2f}"
        bar.set_postfix(post, refresh=False)

    def _check_finite(self) -> None:
        bad = distributed.first_step(int(self.gan_step.first_bad))  # under torchrun: the first bad step on any rank
        if bad >= 0:
            raise _shared(Diverged(f"training diverged: non-finite loss or gradient at step {bad}; "
                                   f"last good checkpoint: {self._last_ckpt()} "
                                   f"(train.on_nan: skip skips such updates instead)"))

    def _last_ckpt(self) -> str:
        found = self.folder.checkpoints()
        return str(found[0]) if found else "none yet"


def _shared(error: UserError) -> UserError:
    """Marks an error that every rank raises alike, so that only rank 0 prints it."""
    error.shared = distributed.is_distributed()
    return error


def _concat(values: list):
    """One output of the evaluator's feature pass, gathered from every rank, joined along the samples: a
    tensor, None (no logits), or a dict of tensors (the extra metrics' features)."""
    if values[0] is None:
        return None
    if isinstance(values[0], dict):
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)
