"""Nothing let in: bad and hostile inputs (config, dataset, checkpoint, run folder) that the CLI must
reject with one clear line and a nonzero exit, touching nothing; a malicious checkpoint whose payload
never runs.

Tests marked `bad_input` are tallied by tests/conftest.py into the line
"faults survived: N/N, bad inputs rejected: M/M" at the end of the pytest output.
"""
from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from gan.core import checkpoint as ckpt
from gan.core.checkpoint import CheckpointError, read_checkpoint
from gan.core.config import ConfigError
from tests.conftest import write_image_folder
from tests.conftest import output_lines as _lines
from tests.conftest import train_args as _train_args

bad_input = pytest.mark.bad_input


# ---------------------------------------------------------------- bad inputs, through the CLI

@pytest.fixture(scope="module")
def finished_run(image_zip, tmp_path_factory) -> Path:
    """A finished 2-step CLI run, whose checkpoint the checkpoint cases start from."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = CliRunner().invoke(cli, _train_args(image_zip, run, "--steps", "2", "--set", "ckpt.every=2"))
    assert result.exit_code == 0, result.output
    return run


def _checkpoint_file(finished_run: Path) -> Path:
    return finished_run / "checkpoints" / "step_0000002.pt"


def _truncated(tmp, run):
    path = tmp / "truncated.pt"
    data = _checkpoint_file(run).read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _text_file(tmp, run):
    path = tmp / "notes.pt"
    path.write_text("these are my notes, not a checkpoint\n")
    return path


def _other_torch_file(tmp, run):
    path = tmp / "tensors.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def _newer_format(tmp, run):
    path = tmp / "future.pt"
    state = read_checkpoint(_checkpoint_file(run))
    state["format_version"] = ckpt.FORMAT_VERSION + 1
    torch.save(state, path)
    return path


def _mixed_sizes(tmp):
    folder = write_image_folder(tmp / "mixed", n_per_class=8, classes=("small",))
    write_image_folder(folder, n_per_class=8, classes=("large",), size=48)
    return folder


def _bad_zip(tmp):
    path = tmp / "broken.zip"
    path.write_bytes(os.urandom(2048))
    return path


def _corrupt_image(tmp):
    folder = write_image_folder(tmp / "corrupt", n_per_class=8)
    # A PNG signature, then bytes no PNG decoder accepts (fixed: PIL may fail to identify the file or fail
    # reading it, depending on the bytes, and both must give the same one-line error).
    (folder / "cats" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(7, 107)))
    return folder


def _empty_zip(tmp):
    path = tmp / "empty.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/readme.txt", "no images here")
    return path


# (id, how to build the argument list from (tmp_path, image_zip, finished_run), expected message regex)
CLI_CASES = [
    ("unknown-key", lambda t, z, r: _train_args(z, t / "o", "--set", "train.stepz=3"),
     r"config: unknown key 'train\.stepz' \(known under 'train': .*\)"),
    ("wrong-type", lambda t, z, r: _train_args(z, t / "o", "--set", "train.lr_g=fast"),
     r"config: train\.lr_g = 'fast' is not valid; expected float"),
    ("negative-steps", lambda t, z, r: _train_args(z, t / "o", "--steps", "-5"),
     r"config: train\.steps = -5 is out of range; must be >= 1"),
    ("batch-size-0", lambda t, z, r: _train_args(z, t / "o", "--batch-size", "0"),
     r"config: train\.batch_size = 0 is out of range; must be >= 1"),
    ("unknown-norm", lambda t, z, r: _train_args(z, t / "o", "--set", "model.norm=ln"),
     r"config: model\.norm = 'ln' is not valid; expected one of bn, mn, none"),
    ("missing-config-file", lambda t, z, r: _train_args(z, t / "o", "--config", str(t / "nope.yaml")),
     r"config: no such file: .*nope\.yaml"),
    ("missing-dataset", lambda t, z, r: _train_args(t / "nowhere", t / "o"),
     r"dataset not found: .*nowhere"),
    ("unreadable-dataset", lambda t, z, r: _train_args(_bad_zip(t), t / "o"),
     r"dataset .*broken\.zip is neither a folder nor a \.zip file"),
    ("corrupt-image", lambda t, z, r: _train_args(_corrupt_image(t), t / "o"),
     r"cannot decode image cats/0003\.png in .*corrupt: not a readable image file( \(.*\))?"),
    ("zip-without-images", lambda t, z, r: _train_args(_empty_zip(t), t / "o"),
     r"no images \(\.png, .*\) found in .*empty\.zip"),
    ("mixed-sizes-no-resize", lambda t, z, r: _train_args(_mixed_sizes(t), t / "o", "--set", "data.resize=false"),
     r"image large/0000\.png is 48x48, not 32x32, and resizing is off \(data\.resize: false\)"),
    ("fewer-images-than-a-batch", lambda t, z, r: _train_args(z, t / "o", "--batch-size", "64"),
     r"the dataset has 48 images, fewer than one batch \(train.batch_size 64\)"),
    ("truncated-checkpoint", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_truncated(t, r))),
     r".*truncated\.pt is not a readable checkpoint \(truncated or not a torch file: RuntimeError: "
     r"PytorchStreamReader failed reading zip archive: failed finding central directory\)"),
    ("text-file-as-checkpoint", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_text_file(t, r))),
     r".*notes\.pt is not a readable checkpoint \(truncated or not a torch file: .*\)"),
    ("foreign-torch-file", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_other_torch_file(t, r))),
     r".*tensors\.pt is not a checkpoint of this project \(no format_version / generator\)"),
    ("other-architecture", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_checkpoint_file(r)),
                                                       "--set", "model.ngf=16"),
     r".*step_0000002\.pt is from a different run configuration \(model\.ngf: 8 -> 16\); use --out for a new run"),
    ("other-norm", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_checkpoint_file(r)), "--norm", "none"),
     r".*step_0000002\.pt is from a different run configuration \(model\.norm: 'bn' -> 'none'\); "
     r"use --out for a new run"),
    ("newer-format", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_newer_format(t, r))),
     rf".*future\.pt has checkpoint format {ckpt.FORMAT_VERSION + 1}, newer than this program's "
     rf"{ckpt.FORMAT_VERSION}: update the program"),
    ("evaluate-truncated", lambda t, z, r: ["evaluate", str(_truncated(t, r)), "--quiet"],
     r".*truncated\.pt is not a readable checkpoint .*"),
    ("unwritable-out", lambda t, z, r: _train_args(z, Path(shutil.copy(z, t / "a-file")) / "run"),
     r"run folder .*a-file/run is not writable: Not a directory"),
    ("folder-holds-another-run", lambda t, z, r: _train_args(z, Path(shutil.copytree(r, t / "copy")),
                                                             "--set", "model.ngf=16"),
     r"run folder .*copy already holds a different run \(model\.ngf: 8 -> 16\); use --out for a new folder, "
     r"or --overwrite to replace it"),
    ("folder-holds-this-run", lambda t, z, r: _train_args(z, Path(shutil.copytree(r, t / "copy"))),
     r"run folder .*copy already holds a run; pass --resume auto .*"),
    # MN's rules across keys, refused with the config (before the data loads), not by the layer.
    ("mn-lambda-min-times-k", lambda t, z, r: _train_args(z, t / "o", "--norm", "mn", "--set",
                                                          "model.mn.lambda_min=0.5"),
     r"config: model\.mn\.lambda_min = 0\.5 is out of range; must be in \[1\.18e-38, 1/num_components\) = \[1\.18e-38, 0\.3333\)"),
    ("mn-em-samples-below-k", lambda t, z, r: _train_args(z, t / "o", "--norm", "mn", "--set", "model.mn.em_samples=2"),
     r"config: model\.mn\.em_samples = 2 is out of range; must be >= max\(2, num_components\) = 3"),
    ("mn-num-components-0", lambda t, z, r: _train_args(z, t / "o", "--norm", "mn", "--set",
                                                        "model.mn.num_components=0"),
     r"config: model\.mn\.num_components = 0 is out of range; must be >= 1"),
    ("ngf-0", lambda t, z, r: _train_args(z, t / "o", "--set", "model.ngf=0"),
     r"config: model\.ngf = 0 is out of range; must be > 0"),
    ("lr-nan", lambda t, z, r: _train_args(z, t / "o", "--set", "train.lr_g=nan"),
     r"config: train\.lr_g = nan is not valid; expected a finite number"),
    ("mn-layer-7", lambda t, z, r: _train_args(z, t / "o", "--set", "model.mn_layers=[7]"),
     r"config: model\.mn_layers = \[7\] is out of range; must be a list of layer indices in 0\.\.2"),
    ("yaml-1.1-boolean", lambda t, z, r: _train_args(z, t / "o", "--set", "model.mn.affine=no"),
     r"config: model\.mn\.affine = 'no' is not valid; expected bool"),
    ("seed-beyond-64-bits", lambda t, z, r: _train_args(z, t / "o", "--seed", str(2**80)),
     r"config: train\.seed = \d+ is out of range; must be in \[0, 2\*\*32\)"),
    ("eval-at-without-evaluation", lambda t, z, r: _train_args(z, t / "o", "--set", "eval.at=[1000]"),
     r"config: eval\.at = \[1000\] needs eval\.every > 0 \(evaluation is off\)"),
    ("bad-option-value", lambda t, z, r: ["evaluate", str(r), "--num-samples", "many"],
     r"Invalid value for '--num-samples': 'many' is not a valid integer\."),
    ("evaluate-grid-not-an-image", lambda t, z, r: ["evaluate", str(r), "--grid", str(t / "grid.json"), "--quiet"],
     r"Invalid value for --grid: .*grid\.json: not an image file name PIL can write \(use \.png or \.jpg\)"),
    ("evaluate-zero-samples", lambda t, z, r: ["evaluate", str(r), "--num-samples", "0", "--quiet"],
     r"--num-samples must be at least 2"),
]


@bad_input
@pytest.mark.parametrize("make_args, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_and_nonzero_exit(make_args, message, tmp_path, image_zip, finished_run):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    result = CliRunner().invoke(cli, make_args(tmp_path, image_zip, finished_run))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an exception escaping as a traceback
    lines = _lines(result.output)
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.fullmatch("error: " + message, lines[0]), lines[0]
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before  # nothing of it touched


@bad_input
def test_debug_shows_the_traceback(tmp_path, image_zip):
    result = CliRunner().invoke(cli, _train_args(image_zip, tmp_path / "o", "--set", "train.stepz=3", "--debug"))
    assert isinstance(result.exception, ConfigError) and result.exc_info[2] is not None
    assert "unknown key 'train.stepz'" in str(result.exception)


# ---------------------------------------------------------------- hostile checkpoints

class _Payload:
    """Unpickling this runs exec(): it writes the marker file. A checkpoint must never do that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@bad_input
def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, image_zip, finished_run):
    marker = tmp_path / "PWNED"
    state = read_checkpoint(_checkpoint_file(finished_run))
    evil = tmp_path / "evil.pt"
    torch.save({**state, "G": _Payload(marker)}, evil)  # a valid-looking checkpoint, payload inside
    legacy = tmp_path / "evil-legacy.pt"
    import pickle
    legacy.write_bytes(pickle.dumps({"format_version": 1, "G": _Payload(marker)}, protocol=2))

    for path in (evil, legacy):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        assert str(e.value).startswith(f"{path} was refused: it holds more than tensors and plain values, "
                                       f"and nothing in it was run (")
        assert "(Unsupported global: GLOBAL exec was not an allowed global by default)" in str(e.value)
        for args in (_train_args(image_zip, tmp_path / "o", "--resume", str(path)),
                     ["evaluate", str(path), "--quiet"]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 2 and _lines(result.output)[0].startswith(f"error: {path} was refused")
            assert len(_lines(result.output)) == 1, result.output
    assert not marker.exists()

    # Control: the payload is live; an unrestricted unpickler would have run it.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"
