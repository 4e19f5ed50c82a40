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
        from gan.errors import UserError
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """DCGAN on CIFAR-10 with BatchNorm (bn) or Mixture Normalization (mn) in the generator.

    Typical use: `python cli.py train --norm mn`, then `python cli.py evaluate runs/mn-seed0`.
    """


def build_config(config_path, norm, steps, batch_size, seed, out, device, data, sets):
    from gan.config import load_config, parse_assignment
    from gan.data import cifar_root, guess_source
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
                     show_default=True, help="YAML config; every key not in it keeps its default."),
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
@click.option("--wandb", "wandb_mode", type=click.Choice(["online", "offline", "disabled"]),
              help="wandb mode [default: $WANDB_MODE, else the config's log.wandb (offline)].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def train(config_path, norm, steps, batch_size, seed, out, device, data, sets, resume, overwrite, wandb_mode,
          quiet):
    """Train a DCGAN; samples, metrics.jsonl and checkpoints go to the run folder.

    FID/KID are computed every eval.every steps against the reference images (eval.reference).
    Ctrl-C (or SIGTERM) saves a checkpoint first; continue with --resume auto.
    """
    from gan.train import Trainer
    cfg = build_config(config_path, norm, steps, batch_size, seed, out, device, data, sets)
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, wandb_mode=wandb_mode, progress=not quiet)
    summary = trainer.run()
    click.echo(json.dumps(summary))


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--num-samples", type=int, help="Generated images to score [default: the run's eval.num_samples].")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the metrics JSON here.")
@click.option("--grid", type=click.Path(dir_okay=False), help="Save an 8x8 sample grid PNG here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--reference", help="Real images to compare with: train, test or a folder/zip [default: the run's].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def evaluate(checkpoint, num_samples, out_file, grid, device, reference, quiet):
    """Print FID, KID (and IS when the full Inception weights are present) of a trained generator.

    CHECKPOINT is a checkpoint file or a run folder (its newest valid checkpoint).
    """
    from gan.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(checkpoint, num_samples, device, reference, grid, progress=not quiet)
    text = json.dumps(result, indent=2)
    click.echo(text)
    if out_file:
        Path(out_file).write_text(text + "\n")


if __name__ == "__main__":
    cli()
