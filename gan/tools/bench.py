"""Benchmarks that report ratios measured side by side in one process, never bare timings.

- train: our training step (BN generator) vs a reference loop written the way the classic PyTorch
  DCGAN example is (DataLoader over CPU tensors, fp32, default memory format, `.item()` every step).
- norm:  our step with MN (K=3, one EM step) vs our step with BN; step time and memory, for each MN variant
  (posteriors joint/per_channel x fit warm/fresh; joint/warm is the default), and the defaults with MN fused
  (compiled, `model.mn.fuse`) on a CPU (unfused on a GPU), all timed side by side; beside each time, the aten ops of one
  eager step, a figure that does not depend on the machine; and the eager defaults' fast path
  (models/mixture_fast.py) against autograd through the core. Then one layer's host time at a tiny batch,
  MN eager and fused vs BN, with what each launches.
- train|norm --compile MODE: the same steps compiled by torch.compile in MODE ("default": kernel fusion;
  "reduce-overhead": CUDA graphs too) vs eager: BN compiled vs eager; MN vs BN both compiled, MN compiled vs eager.
- norm --against REV: this checkout's MN beside REV's (gan/tools/bench_against.py).
- eval:  our Inception feature extraction vs a default `torch_fidelity.calculate_metrics` call on the
  same images, and the FID each gives; then FID from those images' 2048-d statistics, ours vs
  torch-fidelity's `fid_statistics_to_metric`.
Timings alternate between the two sides and report the median, so drift hits both alike.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from gan.core.data import ImageData
from gan.tools.bench_common import (Row, activation_bytes, alternate, alternate_all, make_trainer, run_steps, sync,
                                    synthetic_data)
from gan.tools.bench_eval import bench_eval
from gan.tools.op_count import compiled_generator_kernels, compiled_launches, count_ops


class ReferenceLoop:
    """The classic DCGAN example's loop: DataLoader from CPU float tensors, fp32, `.item()` every step."""

    def __init__(self, data: ImageData, device: torch.device, ngf: int, ndf: int, batch_size: int, z_dim: int = 100):
        from models.dcgan import Discriminator, Generator, dcgan_init
        x = data.images.float() / 127.5 - 1
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch_size,
                                                  shuffle=True, drop_last=True)
        self.it = iter(self.loader)
        self.G, self.D = Generator(z_dim, ngf).to(device), Discriminator(ndf).to(device)
        dcgan_init(self.G), dcgan_init(self.D)
        self.opt_g = torch.optim.Adam(self.G.parameters(), 2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), 2e-4, betas=(0.5, 0.999))
        self.criterion = nn.BCEWithLogitsLoss()
        self.device, self.z_dim = device, z_dim

    def _next(self) -> torch.Tensor:
        try:
            return next(self.it)[0]
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)[0]

    def step(self) -> None:
        real = self._next().to(self.device)
        b = real.shape[0]
        label = torch.full((b,), 1.0, device=self.device)
        self.D.zero_grad()
        out = self.D(real)
        err_real = self.criterion(out, label)
        err_real.backward()
        d_x = torch.sigmoid(out).mean().item()
        fake = self.G(torch.randn(b, self.z_dim, 1, 1, device=self.device))
        label.fill_(0.0)
        out = self.D(fake.detach())
        err_fake = self.criterion(out, label)
        err_fake.backward()
        self.opt_d.step()
        self.G.zero_grad()
        label.fill_(1.0)
        out = self.D(fake)
        err_g = self.criterion(out, label)
        err_g.backward()
        self.opt_g.step()
        _ = (err_real + err_fake).item(), err_g.item(), d_x, torch.sigmoid(out).mean().item()


def bench_train(device: torch.device, steps: int, repeats: int, ngf: int = 64, batch_size: int = 64) -> list[Row]:
    data = synthetic_data()
    with tempfile.TemporaryDirectory() as tmp:
        ours = make_trainer(device.type, "bn", data, Path(tmp) / "ours", **{"model.ngf": ngf, "model.ndf": ngf,
                                                                            "train.batch_size": batch_size})
        ref = ReferenceLoop(data, device, ngf, ngf, batch_size)

        def ref_steps():
            for _ in range(steps):
                ref.step()
        t_ours, t_ref = alternate(lambda: run_steps(ours, steps), ref_steps, repeats, device)
    return [Row("train", f"DCGAN step, BN, batch {batch_size}, ngf={ngf}", t_ours / steps * 1e3,
                t_ref / steps * 1e3, "ms/step", "speed-up vs reference loop", t_ref / t_ours)]


def _warm_up(trainer, steps: int = 4) -> float:
    """Seconds of a compiled trainer's first `steps` steps, left out of its timing: the first runs eagerly by
    design (gan/core/step.py says why), the second compiles, and under CUDA graphs the next ones record."""
    t0 = time.perf_counter()
    run_steps(trainer, steps)
    sync(trainer.device)
    return time.perf_counter() - t0


def _compiled(overrides: dict, mode: str) -> dict:
    return {**overrides, "train.compile": True, "train.compile_mode": mode}


def bench_train_compiled(device: torch.device, steps: int, repeats: int, ngf: int = 64, batch_size: int = 64,
                         mode: str = "default") -> list[Row]:
    """Our BN step compiled in `mode` vs the same step eager, timed in alternation after the compiled
    trainer's warm-up (compilation is not timed; its seconds are reported beside the row)."""
    data = synthetic_data()
    sizes = {"model.ngf": ngf, "model.ndf": ngf, "train.batch_size": batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        eager = make_trainer(device.type, "bn", data, Path(tmp) / "eager", **sizes)
        compiled = make_trainer(device.type, "bn", data, Path(tmp) / "compiled", **_compiled(sizes, mode))
        warm = _warm_up(compiled)
        t_c, t_e = alternate(lambda: run_steps(compiled, steps), lambda: run_steps(eager, steps), repeats, device)
    return [Row("train", f"DCGAN step, BN, batch {batch_size}, ngf={ngf}: compiled ({mode}) vs eager",
                t_c / steps * 1e3, t_e / steps * 1e3, "ms/step", f"compiled ({mode}) speed-up vs eager", t_e / t_c,
                {"warm_up_seconds (compilation included)": warm})]


def bench_norm_compiled(device: torch.device, steps: int, repeats: int, ngf: int = 64, batch_size: int = 64,
                        mode: str = "default") -> list[Row]:
    """MN (the defaults: K=3, one EM step) vs BN, both compiled in `mode`, and MN compiled vs MN eager: four
    trainers timed round robin. Only the default MN variant: each compiled trainer costs a compilation."""
    data = synthetic_data()
    common = {"model.ngf": ngf, "model.ndf": ngf, "train.batch_size": batch_size,
              "model.mn.num_components": 3, "model.mn.em_steps": 1}
    with tempfile.TemporaryDirectory() as tmp:
        mn_c, bn_c = (make_trainer(device.type, norm, data, Path(tmp) / f"{norm}-compiled", **_compiled(common, mode))
                      for norm in ("mn", "bn"))
        mn_e = make_trainer(device.type, "mn", data, Path(tmp) / "mn-eager", **common)
        warm = {norm: _warm_up(tr) for norm, tr in (("MN", mn_c), ("BN", bn_c))}
        t_mn_c, t_bn_c, t_mn_e = alternate_all([lambda tr=tr: run_steps(tr, steps) for tr in (mn_c, bn_c, mn_e)],
                                                repeats, device)
    warm_up = {f"{norm} warm_up_seconds (compilation included)": s for norm, s in warm.items()}
    return [Row("norm", f"DCGAN step, MN (K=3, 1 EM step) vs BN, batch {batch_size}, both compiled ({mode})",
                t_mn_c / steps * 1e3, t_bn_c / steps * 1e3, "ms/step", mn_ratio_name(f"step time, compiled ({mode})"),
                t_mn_c / t_bn_c, warm_up),
            Row("norm", f"DCGAN step, MN (K=3, 1 EM step), batch {batch_size}: compiled ({mode}) vs eager",
                t_mn_c / steps * 1e3, t_mn_e / steps * 1e3, "ms/step", f"MN compiled ({mode}) speed-up vs eager",
                t_mn_e / t_mn_c)]


# MN variants for `bench norm`: name -> config overrides, the variants of configs/study-mn-variants-runs.yaml
# with the settings that study used (fresh fits run 5 EM iterations). lambda_min and prior_scaling are left
# out: they change a constant, not the work. The first (the defaults) keeps the row names that earlier bench
# outputs used; the others' ratio names say which variant they are.
MN_VARIANTS = {
    "joint/warm": {},
    "per_channel": {"model.mn.posteriors": "per_channel"},
    "fresh": {"model.mn.fit": "fresh", "model.mn.em_steps": 5},
    "per_channel+fresh": {"model.mn.posteriors": "per_channel", "model.mn.fit": "fresh", "model.mn.em_steps": 5},
    "layers 0,1": {"model.mn_layers": [0, 1]},
    "layer 0": {"model.mn_layers": [0]},
    "per_channel in layer 0": {"model.mn.posteriors": "per_channel", "model.mn_layers": [0]},
    "grad through posteriors": {"model.mn.detach_posteriors": False},
    "K=2": {"model.mn.num_components": 2},
}
DEFAULT_VARIANT = next(iter(MN_VARIANTS))
# The defaults run eagerly with autograd through models/mixture_core.py instead of the fast path.
CORE_AUTOGRAD = "core autograd"
FAST_RATIO = f"MN fast path/{CORE_AUTOGRAD}"


def norm_variants(device: torch.device) -> dict[str, dict]:
    """MN_VARIANTS plus the defaults with MN fused (compiled) or not, whichever the device does not do by default
    (`model.mn.fuse: auto` fuses on a GPU only): the pair measures what fusing is worth there. The other variants
    run eagerly everywhere: compiling each of them would cost a GPU check minutes."""
    if device.type != "cuda":
        return {**MN_VARIANTS, "fused": {"model.mn.fuse": "always"}}
    eager = {name: o if name == DEFAULT_VARIANT else {**o, "model.mn.fuse": "never"}
             for name, o in MN_VARIANTS.items()}
    return {**eager, "unfused": {"model.mn.fuse": "never"}}


def mn_ratio_name(what: str, variant: str = DEFAULT_VARIANT) -> str:
    """A `bench norm` row's ratio name: "MN/BN step time" for the spec's defaults (the name older bench
    files use), "MN/BN step time, per_channel" for a variant. The headline and scripts/variants_table.py
    look rows up by it."""
    return f"MN/BN {what}" + ("" if variant == DEFAULT_VARIANT else f", {variant}")


def bench_norm(device: torch.device, steps: int, repeats: int, ngf: int = 64, batch_size: int = 64,
               kernels: bool = False) -> list[Row]:
    """MN's variants against BN: step time, memory, aten ops per eager step; with `kernels`, also the kernels
    Inductor generates for one compiled generator step at width 8, BN and the default MN (tens of seconds to
    compile). Then bench_layer_host_time."""
    from models.mixture_norm import MixtureNorm
    data = synthetic_data()
    common = {"model.ngf": ngf, "model.ndf": ngf, "train.batch_size": batch_size,
              "model.mn.num_components": 3, "model.mn.em_steps": 1}
    with tempfile.TemporaryDirectory() as tmp:
        bn = make_trainer(device.type, "bn", data, Path(tmp) / "bn", **common)
        variants = norm_variants(device)
        eager = DEFAULT_VARIANT if device.type != "cuda" else "unfused"  # the defaults, eager
        mns = {name: make_trainer(device.type, "mn", data, Path(tmp) / f"mn{i}", **{**common, **o})
               for i, (name, o) in enumerate({**variants, CORE_AUTOGRAD: variants[eager]}.items())}
        for m in mns[CORE_AUTOGRAD].G.modules():
            if isinstance(m, MixtureNorm):
                m.fast_backward = False
        trainers = [*mns.values(), bn]
        *t_mn, t_bn = alternate_all([lambda tr=tr: run_steps(tr, steps) for tr in trainers], repeats, device)
        if device.type == "cuda":
            what, peaks = "peak GPU memory per step", []
            for tr in trainers:
                torch.cuda.reset_peak_memory_stats(device)
                run_steps(tr, 2)
                peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
        else:
            what, peaks = "tensors saved for backward per step", [activation_bytes(tr) / 2**20 for tr in trainers]
        # On a GPU each aten op is about one kernel launch, and at these sizes launches bound the step: the
        # count tells on any machine what a GPU step will cost. (It includes the optimizer, which a CPU runs
        # tensor by tensor and a GPU fused: the difference MN - BN is the figure to watch.) Compiled code does not
        # run under the counter: a compiled MN (fuse) counts as its eager code here; bench_layer_host_time counts
        # what its compiled code launches.
        counts = [count_ops(lambda tr=tr: run_steps(tr, 1)) for tr in trainers]
        compiled = _compiled_kernels(device) if kernels else {}
        rows = []
        for i, name in enumerate(mns):
            label = "(K=3, 1 EM step) " if name == DEFAULT_VARIANT else f"{name} "
            ops = {"aten ops per step": counts[i].ops, "BN aten ops per step": counts[-1].ops,
                   **(compiled if name == DEFAULT_VARIANT else {})}
            rows.append(Row("norm", f"DCGAN step, MN {label}vs BN, batch {batch_size}",
                            t_mn[i] / steps * 1e3, t_bn / steps * 1e3, "ms/step", mn_ratio_name("step time", name),
                            t_mn[i] / t_bn, ops))
            rows.append(Row("norm", what + ("" if name == DEFAULT_VARIANT else f", MN {name}"), peaks[i], peaks[-1],
                            "MiB", mn_ratio_name("memory", name), peaks[i] / peaks[-1]))
        # What the eager fast path buys (models/mixture_fast.py), against autograd through the core, side by side.
        f, c = list(mns).index(eager), list(mns).index(CORE_AUTOGRAD)
        rows.append(Row("norm", f"DCGAN step, MN eager: fast path vs {CORE_AUTOGRAD}", t_mn[f] / steps * 1e3,
                        t_mn[c] / steps * 1e3, "ms/step", FAST_RATIO + " step time", t_mn[f] / t_mn[c],
                        {"fast path aten ops per step": counts[f].ops, f"{CORE_AUTOGRAD} aten ops per step": counts[c].ops}))
        rows.append(Row("norm", f"{what}, MN eager: fast path vs {CORE_AUTOGRAD}", peaks[f], peaks[c], "MiB",
                        FAST_RATIO + " memory", peaks[f] / peaks[c]))
    return rows + bench_layer_host_time(device, repeats)


def bench_layer_host_time(device: torch.device, repeats: int, calls: int = 100) -> list[Row]:
    """One layer's training forward+backward on a batch so small (4 x 64 x 4 x 4) that the arithmetic is nothing:
    what is left is the host's time to run the layer's code and launch its kernels, which is what an MN layer
    adds to a launch-bound GPU step. MN eager and fused (compiled, `fuse`), each against BN (eager, as the trainer runs
    it), with what each launches: aten ops eagerly, and the compiled code's kernels and library calls."""
    from models.mixture_norm import MixtureNorm2d
    torch.manual_seed(0)
    x = torch.randn(4, 64, 4, 4, device=device).to(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    layers = [MixtureNorm2d(64, fuse=f).to(device) for f in ("never", "always")] + [nn.BatchNorm2d(64).to(device)]
    steps = [lambda layer=layer: layer(x).backward(g) for layer in layers]

    def run(step):
        for _ in range(calls):
            step()

    for step in steps:  # the first steps seed the mixture and compile
        for _ in range(3):
            step()
    *t_mn, t_bn = alternate_all([lambda step=step: run(step) for step in steps], repeats, device)
    eager_ops, bn_ops = count_ops(steps[0]).ops, count_ops(steps[2]).ops
    compiled = compiled_launches(steps[1])
    launches = [{"MN aten ops": eager_ops, "BN aten ops": bn_ops},
                {"MN launches": compiled.total, "of which generated kernels": compiled.kernels,
                 "of which library calls": compiled.library, "BN aten ops": bn_ops}]
    return [Row("norm", f"one layer's forward+backward at batch 4x64x4x4 (host-bound), MN {kind} vs BN",
                t / calls * 1e6, t_bn / calls * 1e6, "us", mn_ratio_name("layer host time", kind), t / t_bn, extra)
            for kind, t, extra in zip(("eager", "fused"), t_mn, launches)]


def _compiled_kernels(device: torch.device) -> dict[str, int]:
    """Kernels Inductor generates for one compiled generator forward+backward (ngf 8, batch 8), MN (defaults)
    and BN: on a GPU each is one launch, so this is what a compiled step's launch count follows."""
    from models.dcgan import Generator
    counts = {}
    for norm in ("mn", "bn"):
        torch.manual_seed(0)
        G = Generator(z_dim=16, ngf=8, norm=norm, mn_options={"num_components": 3, "em_steps": 1}).to(device)
        counts[norm] = compiled_generator_kernels(G)
    return {"compiled G kernels (ngf 8)": counts["mn"], "BN compiled G kernels (ngf 8)": counts["bn"]}


def format_table(rows: list[Row], device: torch.device) -> str:
    w = max([58] + [len(r.what) for r in rows])
    lines = [f"device: {device_name(device)}",
             f"{'bench':<6} {'what':<{w}} {'ours':>10} {'baseline':>10} {'unit':<8} ratio",
             "-" * (w + 52)]
    for r in rows:
        lines.append(f"{r.bench:<6} {r.what:<{w}} {r.ours:>10.2f} {r.baseline:>10.2f} {r.unit:<8} "
                     f"{r.ratio:.2f}x ({r.ratio_name})")
        for k, v in r.extra.items():
            if isinstance(v, int):  # counts
                lines.append(f"{'':<6}   {k} = {v}")
                continue
            lines.append(f"{'':<6}   {k} = {v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{'':<6}   {k} = {v:.2e}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class BenchOptions:
    """`cli.py bench`'s options, which every benchmark reads its own from."""
    steps: int = 10          # training steps per timed repeat
    repeats: int = 5         # timed repeats (eval: half as many); the median is reported
    ngf: int = 64            # generator and discriminator width
    eval_images: int = 250   # generated (and as many real) images for eval
    weights: str | None = None  # Inception weights for eval
    kernels: bool = False    # norm: also count the kernels of a compiled generator step (slow to compile)
    compile: str | None = None  # train, norm: a torch.compile mode (train.compile_mode's, less auto) vs eager
    against: str | None = None  # norm: a git revision whose MN runs beside this checkout's


# name -> benchmark, in the order `bench all` runs them.
BENCHES: dict[str, Callable[[torch.device, BenchOptions], list[Row]]] = {
    "train": lambda device, o: bench_train(device, o.steps, o.repeats, o.ngf),
    "norm": lambda device, o: bench_norm(device, o.steps, o.repeats, o.ngf, kernels=o.kernels),
    "eval": lambda device, o: bench_eval(device, o.eval_images, repeats=max(1, o.repeats // 2), weights_path=o.weights),
}


def _busy_cores(seconds: float = 0.5) -> float | None:
    """Cores' worth of CPU in use now, over `seconds` (/proc/stat; None where there is none). The load
    average would lag: a bench started a minute after another job would still see that job's load."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def busy_warning(device: torch.device) -> str | None:
    """A warning when other processes already use the CPU: a CPU bench then measures the contention more
    than the code (beside a 2-thread training run, both ran about 5x slower per step, unevenly)."""
    if device.type != "cpu":
        return None
    busy, cores = _busy_cores(), os.cpu_count() or 1
    if busy is None or busy < max(0.5, cores / 4):
        return None
    return (f"warning: other processes keep {busy:.1f} of {cores} cores busy, so these ratios can be far off; "
            f"bench on an idle machine")


# name -> benchmark under `--compile MODE`: the compiled step against the eager one. Eval's networks are
# not compiled, so eval has none.
COMPILED_BENCHES: dict[str, Callable[[torch.device, BenchOptions], list[Row]]] = {
    "train": lambda device, o: bench_train_compiled(device, o.steps, o.repeats, o.ngf, mode=o.compile),
    "norm": lambda device, o: bench_norm_compiled(device, o.steps, o.repeats, o.ngf, mode=o.compile),
}


def run_benches(which: str, device: torch.device, options: BenchOptions) -> list[Row]:
    """The rows of one benchmark, or of every one for "all" (with options.compile: train and norm compiled)."""
    if options.against is not None:
        from gan.tools.bench_against import bench_against
        return bench_against(device, options.against, options.steps, options.repeats, options.ngf)
    benches = COMPILED_BENCHES if options.compile else BENCHES
    names = list(benches) if which == "all" else [which]
    return [row for name in names for row in benches[name](device, options)]


def headline(rows: list[Row]) -> str:
    """The last line of `cli.py bench`: every time ratio, the MN variants' as one range (the table has each)."""
    variants = {mn_ratio_name("step time", v) for v in MN_VARIANTS if v != DEFAULT_VARIANT}
    parts = [f"{r.ratio_name} {r.ratio:.2f}x" for r in rows if r.unit != "MiB" and r.ratio_name not in variants]
    others = [r.ratio for r in rows if r.ratio_name in variants]
    if others:
        parts.append(f"MN/BN step time of the {len(others)} other MN variants {min(others):.2f}-{max(others):.2f}x")
    return "headline: " + "; ".join(parts)
