"""Train and evaluate DCGANs with BatchNorm or Mixture Normalization in the generator.

Run `python cli.py COMMAND --help` for each command's options.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def user_errors(fn):
    """Errors the user can fix become one line on stderr and a non-zero exit; --debug shows the traceback."""
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        from gan.core.errors import UserError
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if debug:
                raise
            if not (getattr(e, "shared", False) and not _is_main_process()):  # torchrun: said once, by rank 0
                click.echo(f"{e.label}: {e}" if e.label else str(e), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            # A full disk or read-only mount while writing metrics or samples: the user's to fix too.
            # (Checkpoint writes raise their own UserError, naming the checkpoint that is still valid.)
            import errno
            if debug or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            click.echo(f"error: cannot write {e.filename or 'output'}: {e.strerror}", err=True)
            sys.exit(1)
    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(wrapper)


def _comma_list(ctx, param, value: str | None) -> tuple[str, ...] | None:
    """click callback: "250, 2x" -> ("250", "2x"); what each item means is the command's to check."""
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _check_image_path(path: str, option: str) -> None:
    """Before any work: an image file name whose extension PIL can write (.png, .jpg ...)."""
    from PIL import Image
    Image.init()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt not in Image.SAVE:
        raise click.BadParameter(f"{path}: not an image file name PIL can write (use .png or .jpg)",
                                 param_hint=option)


def _is_main_process() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"  # torchrun's global rank (the process group may be gone)


class OneLineErrors(click.Group):
    """click's own usage errors (a bad option value, a missing argument) as one `error:` line too, like the
    commands' errors, instead of click's usage block; exit status 2 as click's."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare `cli.py` or group: its help, as click shows it
            click.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """DCGAN on CIFAR-10 with BatchNorm (bn) or Mixture Normalization (mn) in the generator.

    Typical use: `python cli.py train --norm mn`, then `python cli.py evaluate runs/mn-seed0`.
    """


def build_config(config_path, norm, steps, batch_size, seed, out, device, data, sets):
    from gan.core.config import load_config, parse_assignment
    from gan.core.data import cifar_root, guess_source
    overrides: dict = {}
    for text in sets:
        key, value = parse_assignment(text)
        overrides[key] = value
    if data is not None:
        source = guess_source(data)
        overrides["data.source"] = source
        overrides["data.path"] = cifar_root(data) if source == "cifar10" else data
    for key, value in (("model.norm", norm), ("train.steps", steps), ("train.batch_size", batch_size),
                       ("train.seed", seed), ("run_dir", out), ("train.device", device)):
        if value is not None:
            overrides[key] = value
    return load_config(config_path, overrides)


def config_options(fn):
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=str(DEFAULT_CONFIG),
                     show_default="configs/default.yaml", help="YAML config; every key not in it keeps its default."),
        click.option("--norm", type=click.Choice(["bn", "mn", "none"]), help="Generator normalization."),
        click.option("--steps", type=int, help="Generator updates to train for."),
        click.option("--batch-size", type=int, help="Images per batch."),
        click.option("--seed", type=int, help="Seed for weights, noise and data order."),
        click.option("--out", type=click.Path(file_okay=False), help="Run folder [default: runs/<norm>-seed<seed>]."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto picks CUDA when present."),
        click.option("--data", type=click.Path(),
                     help="Training images: a folder or .zip of class folders, or a folder holding "
                          "torchvision's cifar-10-batches-py."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set model.mn.num_components=2 (repeatable)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command()
@config_options
@click.option("--resume", metavar="PATH|auto",
              help="Continue from a checkpoint, or 'auto' for the newest valid one in the run folder.")
@click.option("--overwrite", is_flag=True, help="Start again in a run folder that already holds a run.")
@click.option("--wandb", "wandb_mode", type=click.Choice(["auto", "online", "offline", "disabled"]),
              help="wandb mode [default: $WANDB_MODE, else the config's log.wandb (auto: online when "
                   "wandb has credentials, else offline)].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def train(config_path, norm, steps, batch_size, seed, out, device, data, sets, resume, overwrite, wandb_mode,
          quiet):
    """Train a DCGAN; samples, metrics.jsonl and checkpoints go to the run folder.

    FID/KID are computed every eval.every steps against the reference images (eval.reference).
    Ctrl-C (or SIGTERM) saves a checkpoint first; continue with --resume auto. On a CPU, a run expected
    to take over 30 minutes, evaluations included, says so after its first steps (not with --quiet).

    Several GPUs or machines: start it with torchrun (`torchrun --nproc_per_node N cli.py train ...`);
    train.batch_size is then the global batch, split across the N processes; rank 0 writes the files.
    """
    from gan.core import distributed
    from gan.core.device import resolve_device
    from gan.core.train import Trainer
    from gan.eval.metrics import Evaluator
    cfg = build_config(config_path, norm, steps, batch_size, seed, out, device, data, sets)
    distributed.setup(resolve_device(cfg.train.device).type, cfg.train.dist_timeout)  # no-op without torchrun
    main = distributed.is_main()
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, wandb_mode=wandb_mode, progress=not quiet,
                          make_evaluator=Evaluator.from_config)
        summary = trainer.run()
    finally:
        distributed.teardown()
    if main:
        click.echo(json.dumps(summary))


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--num-samples", type=int, help="Generated images to score [default: the run's eval.num_samples].")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the metrics JSON here.")
@click.option("--grid", type=click.Path(dir_okay=False), help="Save an 8x8 sample grid PNG here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--reference", help="Real images to compare with: train, test or a folder/zip [default: the run's].")
@click.option("--g-mode", type=click.Choice(["eval", "train"]),
              help="Sample with running statistics (eval) or batch statistics (train) [default: the run's].")
@click.option("--vgg16-prc", is_flag=True,
              help="Also precision_vgg16 and recall_vgg16 (VGG16 features) [default: the run's metrics.vgg16_prc].")
@click.option("--fd-dinov2", is_flag=True,
              help="Also fd_dinov2 (Fréchet distance on DINOv2 features) [default: the run's metrics.fd_dinov2].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def evaluate(checkpoint, num_samples, out_file, grid, device, reference, g_mode, vgg16_prc, fd_dinov2, quiet):
    """Print FID, KID, precision, recall, density and coverage (and IS when the full Inception weights are
    present) of a trained generator; the extras too where asked for and their weights can be had.

    CHECKPOINT is a checkpoint file or a run folder (its newest valid checkpoint).
    """
    from gan.eval.evaluate import evaluate_checkpoint
    if grid:
        _check_image_path(grid, "--grid")
    for path in (out_file, grid):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    extras = [k for k, on in (("vgg16_prc", vgg16_prc), ("fd_dinov2", fd_dinov2)) if on]
    result = evaluate_checkpoint(checkpoint, num_samples, device, reference, grid, g_mode, progress=not quiet,
                                 extras=extras)
    text = json.dumps(result, indent=2)
    click.echo(text)
    if out_file:
        Path(out_file).write_text(text + "\n")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the PNGs [default: <run folder>/diagnose].")
@click.option("--num-samples", type=int, default=256, show_default=True, help="Noise vectors in the batch.")
@click.option("--channels", type=int, default=4, show_default=True, help="Channels plotted per layer.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@user_errors
def diagnose(checkpoint, out_dir, num_samples, channels, device):
    """Why MN may help: the generator's pre-normalization activations, layer by layer.

    For each BN/MN layer, saves a PNG with histograms of a few channels before normalization, the
    fitted mixture overlaid (an MN layer's own running mixture; for BN layers one is fitted with the
    same EM code), and the histogram after normalization. Prints skewness, excess kurtosis and
    mixture weights per layer. CHECKPOINT is a checkpoint file or a run folder.
    """
    from gan.core.run_folder import RunFolder
    from gan.tools.diagnose import diagnose as run_diagnose, format_report
    from gan.eval.evaluate import load_generator
    from gan.core.device import resolve_device
    if num_samples < 2 or channels < 1:
        raise click.BadParameter("--num-samples must be >= 2 and --channels >= 1")
    dev = resolve_device(device)
    G, cfg, state = load_generator(checkpoint, dev)
    out = Path(out_dir) if out_dir else RunFolder.holding(checkpoint).path / "diagnose"
    out.mkdir(parents=True, exist_ok=True)
    rows = run_diagnose(G, cfg.model.z_dim, out, dev, num_samples=num_samples, channels=channels,
                        num_components=cfg.model.mn.num_components)
    click.echo(f"{checkpoint} (step {state['step']}, norm {cfg.model.norm})")
    click.echo(format_report(rows))
    click.echo(f"PNGs in {out}")


@cli.command()
@click.argument("which", type=click.Choice(["train", "norm", "eval", "all"]), default="all")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--steps", type=int, default=10, show_default=True, help="Training steps per timed repeat.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed repeats; the median is reported.")
@click.option("--ngf", type=int, default=64, show_default=True, help="Generator/discriminator width.")
@click.option("--eval-images", type=int, default=250, show_default=True,
              help="Generated (and as many real) images for the eval benchmark.")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True),
              help="Inception weights file for the eval benchmark [default: metrics.inception_weights' default].")
@click.option("--kernels", is_flag=True,
              help="norm: also count the kernels Inductor generates for a compiled generator step (slow).")
@click.option("--compile", "compile_mode", is_flag=False, flag_value="default", default=None,
              type=click.Choice(["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
              help="train, norm: time the step compiled in this torch.compile mode against eager "
                   "[bare --compile: default]; compilation is not timed.")
@click.option("--against", metavar="REV",
              help="norm: this checkout's MN beside MN at git revision REV, in one run (step time, memory, one "
                   "layer's eager ops and compiled launches).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), help="Also write the numbers here.")
@user_errors
def bench(which, device, steps, repeats, ngf, eval_images, weights, kernels, compile_mode, against, json_file):
    """Speed as ratios measured side by side in this process (median of repeats, after warm-up).

    train: our step vs the classic DCGAN example's loop; norm: MN vs BN step time and memory, and MN's eager fast
    backward vs autograd through its core (with --against REV: this MN vs REV's); eval: our Inception feature
    extraction vs torch-fidelity's default path, and their FIDs.
    With --compile: train and norm compiled vs eager (all = both). The last line is the headline ratio.
    """
    import dataclasses
    from gan.tools.bench import BenchOptions, busy_warning, format_table, headline, run_benches
    from gan.core.device import resolve_device
    dev = resolve_device(device)
    if min(steps, repeats, ngf, eval_images) < 1:
        raise click.BadParameter("--steps, --repeats, --ngf and --eval-images must be positive")
    if compile_mode and which == "eval":
        raise click.BadParameter("--compile times the training step: bench train, norm or all")
    if against is not None and (which != "norm" or compile_mode):
        raise click.BadParameter("--against compares MN's code: bench norm, without --compile")
    if warning := busy_warning(dev):
        click.echo(warning, err=True)
    rows = run_benches(which, dev, BenchOptions(steps, repeats, ngf, eval_images, weights, kernels,
                                                 compile=compile_mode, against=against))
    click.echo(format_table(rows, dev))
    if json_file:
        Path(json_file).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    click.echo(headline(rows))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the outputs [default: <the runs' common parent>/compare].")
@click.option("--metric", type=click.Choice(["fid", "kid", "precision", "recall", "density", "coverage",
                                             "precision_vgg16", "recall_vgg16", "fd_dinov2"]),
              default="fid", show_default=True,
              help="Metric to compare (kid uses kid_mean; precision, recall, density and coverage, and "
                   "precision_vgg16 and recall_vgg16, are better higher); fid writes compare.*, the others "
                   "compare-<metric>.*. With precision and recall in the runs, precision-recall.png plots "
                   "one against the other over training.")
@click.option("--target", type=float,
              help="Metric value for 'steps to target' [default: the baseline group's best, mean over seeds].")
@click.option("--also-at", metavar="V1,V2,...", callback=_comma_list, default="",
              help="More metric values (comma-separated, e.g. 250,150,120,100 for FID), or multiples of the "
                   "target (2x,1.5x,1.25x: looser targets than the baseline's best): a second table of "
                   "steps to each and speed-ups at each.")
@click.option("--baseline", metavar="LABEL|RUN",
              help="Group the speed-ups are relative to: a group label or one of its run folders "
                   "[default: the bn group].")
@click.option("--force", is_flag=True, help="Compare runs even when their data or evaluation setup differs.")
@click.option("--common-steps", is_flag=True,
              help="Only evaluations up to the last step every run reached (runs of unequal length).")
@user_errors
def compare(run_dirs, out, metric, target, also_at, baseline, force, common_steps):
    """Compare runs: metric curves (PNG), a markdown table and JSON.

    RUN_DIR is a run folder (config.yaml + metrics.jsonl), or a folder of run folders such as a study's
    out folder. Runs are grouped by the config keys that differ between them (seed, folder, length,
    device, logging and checkpoint settings do not count), e.g. "norm=mn, mn.num_components=2".

    Per group: seeds (* = still running), best metric (mean ± std over seeds) and the step of each
    seed's best, final metric, steps and training time to reach the target (per seed the first
    evaluation at or below it; at or above for precision, recall, density, coverage and the VGG16
    precision and recall), speed-up =
    baseline's steps (time) to target / the group's, and seconds per step. The PNG shows mean and min..max
    band over seeds vs step and vs training time.

    Runs with no evaluations yet are skipped with a warning; runs with different data.source/path/split
    or eval.reference/reference_samples/num_samples are refused unless --force.
    """
    from gan.tools.compare import compare_runs
    result = compare_runs(run_dirs, out, metric, target, force, baseline,
                          warn=lambda m: click.echo(m, err=True), common_steps=common_steps, also_at=also_at)
    click.echo(result.markdown)
    click.echo(f"wrote {', '.join(str(f) for f in result.files)}")


@cli.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs trained at once, one process each (a GPU is mostly idle with one small DCGAN: "
                   "try 4-6 there; 1 on a CPU). With several GPUs, runs are spread over them.")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True),
              help="Stop every run cleanly (checkpoint) this long after the start, then compare over the "
                   "steps all runs reached [default: the file's budget_minutes, else none].")
@click.option("--also-at", metavar="2x,1.5x,...", callback=_comma_list,
              help="Multiples of the target (the baseline's best) at which the comparison also reports steps "
                   "to target and speed-ups [default: the file's also_at, else none].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Config override for every run, over the file's set: (repeatable).")
@click.option("--dry-run", is_flag=True, help="List each run's state and command; train nothing.")
@click.option("--emit-commands", is_flag=True,
              help="Print one self-contained train command per unfinished run (for a SLURM array or "
                   "any scheduler) and exit; a later `study FILE` compares what has finished.")
@user_errors
def study(study_file, jobs, budget_minutes, also_at, sets, dry_run, emit_commands):
    """Train every (variant, seed) of a study file, then compare them into OUT/compare.

    \b
    A study file (paths relative to the current folder):
      base: configs/study-cpu.yaml  # config every run starts from
      out: runs/study-cpu           # runs go to OUT/<variant>-s<seed>
      seeds: [0, 1]                 # default seeds
      set: {train.device: cpu}      # optional overrides for every variant
      budget_minutes: 7             # optional time budget for the whole study
      also_at: [2x, 1.5x]           # optional looser targets, multiples of the baseline's best
      variants:                     # name: dotted overrides [+ own seeds]
        bn: {model.norm: bn}
        mn: {model.norm: mn}
        mn-layer0: {model.norm: mn, model.mn_layers: [0], seeds: [0]}

    Each run is `cli.py train --config BASE --set ... --seed S --out OUT/<run> --resume auto --quiet`,
    logged to OUT/<run>/train.log. The reference statistics are computed once before the runs start.
    Finished runs are skipped and stopped ones resume, so after Ctrl-C or the budget (each run saves a
    checkpoint) the same command continues the study.
    """
    from gan.core.config import parse_assignment
    from gan.tools.study import check_also_at, emit_commands as commands, load_study, run_study
    study = load_study(study_file, dict(parse_assignment(s) for s in sets))
    if also_at is not None:
        study.also_at = check_also_at(also_at, "--also-at")
    if emit_commands:
        for line in commands(study):
            click.echo(line)
        return
    run_study(study, jobs, dry_run, echo=click.echo, warn=lambda m: click.echo(m, err=True),
              budget_minutes=budget_minutes)


if __name__ == "__main__":
    cli()
