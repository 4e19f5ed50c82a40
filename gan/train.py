"""The training loop: one class that owns the models, the loop, checkpoints, evaluation and logging."""
from __future__ import annotations

import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gan import checkpoint as ckpt
from gan.config import Config, RESUMABLE_CHANGES, config_diff, config_from_dict
from gan.data import BatchStream, ImageData, load_dataset
from gan.errors import UserError
from gan.sampling import build_reference, generate, to_uint8
from gan.tracking import RunLogger
from models.dcgan import build_models


class Diverged(UserError):
    exit_code = 3


class Interrupted(UserError):
    """SIGINT / SIGTERM: the checkpoint is saved; exit with the shell's code for that signal."""

    def __init__(self, signum: int, step: int, path: Path):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved at {path} "
                         f"(continue with --resume auto)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    amp = cfg.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]




class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False,
                 wandb_mode: str | None = None, progress: bool = True, data: ImageData | None = None):
        from gan.tracking import resolve_wandb_mode
        self.cfg = cfg
        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = cfg.resolved_run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        state = self._prepare_run_dir(resume, overwrite)

        torch.manual_seed(cfg.train.seed)
        # `data` lets benchmarks and tests hand over images that are already in memory.
        self.data = data or load_dataset(cfg.data.source, cfg.data.path, cfg.data.split, cfg.data.download,
                                         cfg.data.resize, progress)
        images = self.data.images
        if self.device.type == "cuda" and cfg.data.on_device:
            images = images.to(self.device)
        self.stream = BatchStream(images, cfg.train.batch_size, cfg.train.seed, cfg.data.hflip, self.device)

        self.G, self.D = build_models(cfg)
        self.G.to(self.device)
        self.D.to(self.device)
        if cfg.train.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        fused = self.device.type == "cuda"
        t = cfg.train
        self.opt_g = torch.optim.Adam(self.G.parameters(), t.lr_g, (t.beta1, t.beta2), fused=fused or None)
        self.opt_d = torch.optim.Adam(self.D.parameters(), t.lr_d, (t.beta1, t.beta2), fused=fused or None)
        self.amp = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.ema = None
        if t.ema_decay > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.G, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay))
        if t.compile:
            self._compile()
        # First step whose loss or gradient was not finite, kept on the device so the hot loop never syncs.
        self._first_bad = torch.tensor(-1, device=self.device)

        self.step = 0
        self.train_time = 0.0
        self.history: list[dict] = []
        self.best: dict | None = None
        if state is not None:
            self._restore(state)
        self.fixed_z_seed = cfg.train.seed + 10_007
        self.evaluator = None
        self.logger = RunLogger(self.run_dir, cfg.to_dict(), resolve_wandb_mode(wandb_mode, cfg.log.wandb),
                                cfg.log.wandb_project, self.step if state is not None else None)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ run folder and resume

    def _prepare_run_dir(self, resume: str | None, overwrite: bool) -> dict | None:
        run_dir, cfg = self.run_dir, self.cfg
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None
        saved = run_dir / "config.yaml"
        state = None
        ckpt.remove_stale_temps(self.ckpt_dir)
        if resume:
            source = resume
            if resume == "auto":
                found = ckpt.latest_valid(self.ckpt_dir)
                if found is not None:
                    source, state = found
                elif ckpt.list_checkpoints(self.ckpt_dir):
                    print(f"warning: no valid checkpoint in {self.ckpt_dir}; starting from step 0",
                          file=sys.stderr)
            else:
                state = ckpt.load_checkpoint(resume)
            if state is not None:
                self._check_compatible(state, source)
                print(f"resuming from {source} at step {state['step']}", file=sys.stderr)
        elif overwrite:
            for p in ckpt.list_checkpoints(self.ckpt_dir) + [self.ckpt_dir / "best.pt"]:
                p.unlink(missing_ok=True)
        elif saved.exists():
            differs = self._saved_config_diff(saved)
            if differs is not None:
                raise UserError(f"run folder {run_dir} already holds a different run ({differs}); "
                                f"use --out for a new folder, or --overwrite to replace it")
            if ckpt.list_checkpoints(self.ckpt_dir):
                raise UserError(f"run folder {run_dir} already holds a run; pass --resume auto to continue it, "
                                f"--overwrite to start it again, or --out for a new folder")
        _atomic_write_text(saved, cfg.to_yaml())
        return state

    def _saved_config_diff(self, saved: Path) -> str | None:
        """What the run folder's config.yaml changes against this config; None when nothing does."""
        import yaml
        try:
            old = config_from_dict(yaml.safe_load(saved.read_text()))
        except (UserError, yaml.YAMLError, OSError, TypeError):
            return "its config.yaml is unreadable"
        diff = config_diff(old, self.cfg, RESUMABLE_CHANGES)
        if not diff:
            return None
        return ", ".join(f"{k}: {_get(old, k)!r} -> {_get(self.cfg, k)!r}" for k in diff[:4])

    def _check_compatible(self, state: dict, source) -> None:
        try:
            old = config_from_dict(state["config"])
        except (UserError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"{source}: its config is not valid here: {e}") from None
        diff = config_diff(old, self.cfg, RESUMABLE_CHANGES)
        if diff:
            shown = ", ".join(f"{k}: {_get(old, k)!r} -> {_get(self.cfg, k)!r}" for k in diff[:4])
            raise ckpt.CheckpointError(f"{source} is from a different run configuration ({shown}); "
                                       f"use --out for a new run")

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
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.train_time = state.get("train_time", 0.0)
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def state_dict(self) -> dict:
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "step": self.step, "config": self.cfg.to_dict(),
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng},
            "history": self.history, "best": self.best, "train_time": self.train_time,
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.state_dict(), self.ckpt_dir, self.cfg.ckpt.keep)

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def _d_step(self, real: torch.Tensor, z: torch.Tensor):
        with self._autocast():
            fake = self.G(z)
            d_real = self.D(real).float()
            d_fake = self.D(fake.detach()).float()
            # Non-saturating GAN loss; softplus(-x) is BCE-with-logits against 1, softplus(x) against 0.
            loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        self._apply(self.opt_d, self.D, loss_d)
        return fake, loss_d.detach(), d_real.detach(), d_fake.detach()

    def _g_step(self, fake: torch.Tensor):
        with self._autocast():
            loss_g = F.softplus(-self.D(fake).float()).mean()
        self._apply(self.opt_g, self.G, loss_g)
        self.scaler.update()
        return loss_g.detach()

    def _apply(self, opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():
            # Under fp16 loss scaling, inf gradients are routine overflow: the scaler skips that
            # update and lowers its scale by itself, so only the loss says the run diverged.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = finite & torch.isfinite(torch.stack([g.float().norm() for g in grads]).sum())
        if self.cfg.train.on_nan == "skip":
            # This mode pays a host sync per update to keep a bad batch out of the weights.
            if not finite.item():
                if not self._skipped:  # one line per step, though D's and G's updates may both go
                    print(f"warning: non-finite loss or gradient at step {self.step + 1}; update skipped",
                          file=sys.stderr)
                opt.zero_grad(set_to_none=True)
                self._skipped = True
                return
        else:
            self._first_bad = torch.where(finite | (self._first_bad >= 0), self._first_bad,
                                          torch.tensor(self.step + 1, device=self.device))
        self.scaler.step(opt)

    def _compile(self) -> None:
        # In place, so state_dict keys (and so checkpoints) are the same with and without compile.
        try:
            self.G.compile()
            self.D.compile()
        except Exception as e:  # no compiler toolchain, unsupported platform
            print(f"warning: train.compile ignored ({type(e).__name__}: {e})", file=sys.stderr)

    def train_step(self) -> dict | None:
        """One generator update after `d_steps` discriminator updates; returns device scalars,
        or None when `on_nan: skip` refused an update."""
        cfg = self.cfg.train
        self._skipped = False
        for j in range(cfg.d_steps):
            real = self.stream.batch(self.step * cfg.d_steps + j)
            if self.cfg.train.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            z = torch.randn(cfg.batch_size, self.cfg.model.z_dim, device=self.device)
            # The last discriminator step's fakes are reused for the generator step, as in the DCGAN example.
            fake, loss_d, d_real, d_fake = self._d_step(real, z)
        loss_g = self._g_step(fake)
        if self._skipped:
            return None
        if self.ema is not None:
            self.ema.update_parameters(self.G)
            for b_ema, b in zip(self.ema.module.buffers(), self.G.buffers()):
                b_ema.copy_(b)
        return {"loss_d": loss_d, "loss_g": loss_g,
                "d_real": torch.sigmoid(d_real).mean(), "d_fake": torch.sigmoid(d_fake).mean()}

    # ------------------------------------------------------------------ sampling and evaluation

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator that samples and metrics come from: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.G

    def _evaluator(self):
        if self.evaluator is None:
            from gan.metrics import Evaluator, resolve_inception_weights
            m = self.cfg.metrics
            weights = resolve_inception_weights(m.inception_weights, m.cache_dir, m.allow_download)
            load, ident = build_reference(self.cfg, lambda: self.data)
            self.evaluator = Evaluator(weights, self.device, load, ident, cache_dir=m.cache_dir,
                                       batch_size=self.cfg.eval.batch_size, kid_subset_size=m.kid_subset_size,
                                       kid_subsets=m.kid_subsets, verbose=self.progress)
        return self.evaluator

    def evaluate(self) -> dict:
        e = self.cfg.eval
        images = generate(self.sampler, e.num_samples, self.cfg.model.z_dim, e.seed, self.device,
                          e.batch_size, e.g_mode)
        result = self._evaluator().score(to_uint8(images))
        result = {k: float(v) for k, v in result.items()}
        result["ema"] = self.ema is not None
        return result

    def write_samples(self) -> Path:
        images = generate(self.sampler, 64, self.cfg.model.z_dim, self.fixed_z_seed, self.device,
                          g_mode=self.cfg.eval.g_mode)
        caption = f"step {self.step}" + (" (EMA generator)" if self.ema is not None else "")
        return self.logger.samples(self.step, images, caption)

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self._stop_signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              f"(press Ctrl-C again to quit at once)", file=sys.stderr)

    def run(self) -> dict:
        cfg = self.cfg
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.logger.close()

    def _every(self, n: int) -> bool:
        return n > 0 and self.step % n == 0

    def _loop(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and cfg.log.sample_every:
            self.write_samples()
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_time = 0, 0.0
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=self.run_dir.name, unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        last_fid = self.history[-1]["fid"] if self.history and "fid" in self.history[-1] else None
        self.G.train()
        self.D.train()
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            scalars = self.train_step()
            for k, v in (scalars or {}).items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            self.step += 1
            window_steps += 1
            if self.device.type == "cuda" and self._every(cfg.log.every):
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            window_time += dt
            self.train_time += dt
            bar.update(1)

            last = self.step == cfg.train.steps
            record: dict = {}
            evaluating = self._every(cfg.eval.every) or (last and cfg.eval.every)
            if (self._every(cfg.log.every) or last or self._every(cfg.ckpt.every) or evaluating
                    or self._stop_signal is not None):
                # Nothing is saved or scored past this point with weights a bad update has touched.
                self._check_finite()
            if self._every(cfg.log.every) or last or self._every(cfg.ckpt.every):
                means = {k: (v / window_steps).item() for k, v in sums.items()}
                record.update(means)
                record["sec_per_step"] = window_time / window_steps
                record["train_time"] = self.train_time
                sums, window_steps, window_time = {}, 0, 0.0
            if evaluating:
                metrics = self.evaluate()
                record.update(metrics)
                self.history.append({"step": self.step, **metrics})
                last_fid = metrics["fid"]
                if self.best is None or metrics["fid"] < self.best["fid"]:
                    self.best = {"step": self.step, "fid": metrics["fid"]}
                    self.logger.summary({"best_fid": self.best["fid"], "best_step": self.step})
                    ckpt.write_checkpoint(self.state_dict(), self.ckpt_dir / "best.pt")
            if record:
                record.setdefault("train_time", self.train_time)
                self.logger.log(self.step, record)
                post = {k: f"{record[k]:.3f}" for k in ("loss_d", "loss_g") if k in record}
                if last_fid is not None:
                    post["fid"] = f"{last_fid:.2f}"
                bar.set_postfix(post, refresh=False)
            if self._every(cfg.log.sample_every) or last:
                self.write_samples()
            if self._every(cfg.ckpt.every) or last:
                self.save()
            if self._stop_signal is not None:
                bar.close()
                path = self.save() if not (self._every(cfg.ckpt.every) or last) else self._last_ckpt()
                raise Interrupted(self._stop_signal, self.step, path)
        bar.close()
        summary = {"step": self.step, "train_time": self.train_time, "run_dir": str(self.run_dir)}
        if self.best:
            summary.update(best_fid=self.best["fid"], best_step=self.best["step"])
        return summary

    def _check_finite(self) -> None:
        bad = int(self._first_bad)
        if bad >= 0:
            raise Diverged(f"training diverged: non-finite loss or gradient at step {bad}; "
                           f"last good checkpoint: {self._last_ckpt()} "
                           f"(train.on_nan: skip skips such updates instead)")

    def _last_ckpt(self) -> str:
        found = ckpt.list_checkpoints(self.ckpt_dir)
        return str(found[0]) if found else "none yet"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
