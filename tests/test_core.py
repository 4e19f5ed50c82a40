"""The application end to end: models, config, data, a short run, resume, wandb, evaluate."""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
import torchvision
import yaml
from click.testing import CliRunner

from cli import cli
from gan.core.config import ConfigError, config_from_dict, load_config, parse_assignment
from gan.core.data import BatchStream, DataError, load_dataset
from gan.core.train import Trainer
from models.dcgan import Discriminator, Generator


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("norm", ["bn", "none"])
def test_model_shapes(norm):
    G, D = Generator(z_dim=100, ngf=16, norm=norm), Discriminator(ndf=16)
    x = G(torch.randn(5, 100))
    assert x.shape == (5, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)


def test_generator_widths_follow_ngf():
    G = Generator(z_dim=100, ngf=64)
    convs = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 3]


# ---------------------------------------------------------------- config

def test_config_round_trip(tmp_path):
    cfg = load_config(ROOT_CONFIG, {"model.norm": "mn", "train.lr_g": 1e-4, "model.mn_layers": [0]})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.model.mn_layers == [0] and again.train.lr_g == 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"train.stepz": 3}, "unknown key 'train.stepz'"),
    ({"train.steps": -5}, "train.steps = -5 is out of range"),
    ({"train.batch_size": 0}, "train.batch_size = 0 is out of range"),
    ({"model.norm": "ln"}, "model.norm = 'ln' is not valid; expected one of bn, mn, none"),
    ({"train.lr_g": "fast"}, "train.lr_g = 'fast' is not valid; expected float"),
])
def test_bad_config_fails_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_bad_config_via_cli_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  learning_rate: 3\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(bad)])
    assert result.exit_code == 2
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert lines == ["error: config: unknown key 'train.learning_rate' (known under 'train': amp, batch_size, "
                     "beta1, beta2, channels_last, compile, compile_mode, d_steps, device, dist_timeout, "
                     "ema_decay, fused_adam, lr_d, lr_g, on_nan, seed, steps, threads)"]


def test_each_key_s_roles_live_on_its_field():
    """What resume, compare and study treat specially comes from the fields' metadata (gan/core/config.py)."""
    from gan.tools import compare, study
    from gan.core.config import _RULES, KEY_ROLES, RESUMABLE_CHANGES, Config, flatten, key
    assert list(KEY_ROLES) == list(flatten(Config().to_dict()))
    # A resume may change the length, logging, device and paths; never the maths.
    assert {"train.steps", "train.device", "log.every", "ckpt.keep", "eval.every", "data.path"} <= set(RESUMABLE_CHANGES)
    assert not {"model.mn.num_components", "train.lr_g", "train.seed", "log.wandb_project"} & set(RESUMABLE_CHANGES)
    # A section's role is every key's in it.
    assert {"log.every", "log.wandb_project", "ckpt.keep", "train.seed", "run_dir"} <= set(compare.NOT_GROUPING)
    assert "model.norm" not in compare.NOT_GROUPING and "data.path" in compare.MUST_MATCH
    assert set(compare.MN_ONLY) == {"model.mn_layers"} | {k for k in KEY_ROLES if k.startswith("model.mn.")}
    assert set(study.STUDY_OWNED) == {"run_dir", "train.seed"}
    assert _RULES["train.beta1"][1] == "in [0, 1)" and "model.norm" not in _RULES
    with pytest.raises(TypeError, match="unknown config key role"):
        key(1, resumeable=True)


def test_set_parses_yaml_values():
    assert parse_assignment("model.mn_layers=[0, 2]") == ("model.mn_layers", [0, 2])
    assert parse_assignment("train.lr_g=1e-4") == ("train.lr_g", 1e-4)
    assert parse_assignment("train.compile=true") == ("train.compile", True)


# ---------------------------------------------------------------- data

def test_image_folder_and_zip_load_alike(image_folder, image_zip):
    a = load_dataset("folder", str(image_folder))
    b = load_dataset("folder", str(image_zip))
    for d in (a, b):
        assert d.images.shape == (48, 3, 32, 32) and d.images.dtype == torch.uint8
        assert d.classes == ["cats", "dogs"]
        assert d.labels.tolist() == [0] * 24 + [1] * 24
    assert torch.equal(a.images, b.images)


def test_images_are_resized_or_refused(tmp_path):
    from tests.conftest import write_image_folder
    folder = write_image_folder(tmp_path / "big", n_per_class=2, size=48)
    assert load_dataset("folder", str(folder)).images.shape == (4, 3, 32, 32)
    with pytest.raises(DataError, match="not 32x32, and resizing is off"):
        load_dataset("folder", str(folder), resize=False)


def test_empty_zip_is_refused(tmp_path):
    import zipfile
    path = tmp_path / "empty.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "no images here")
    with pytest.raises(DataError, match="no images"):
        load_dataset("folder", str(path))


def test_dataset_identity_follows_content_not_location(image_folder, image_zip, tmp_path):
    """The reference-statistics cache is keyed by it: a copied or re-mounted dataset must still hit."""
    import os
    import shutil
    from gan.core.data import dataset_identity
    zip_copy = shutil.copy(image_zip, tmp_path / image_zip.name)
    os.utime(zip_copy, (1, 1))
    assert dataset_identity("folder", zip_copy) == dataset_identity("folder", image_zip)
    folder_copy = shutil.copytree(image_folder, tmp_path / image_folder.name)
    assert dataset_identity("folder", folder_copy) == dataset_identity("folder", image_folder)
    assert dataset_identity("folder", image_zip, resize=False) != dataset_identity("folder", image_zip)

    with open(zip_copy, "r+b") as f:  # same size, different bytes
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert dataset_identity("folder", zip_copy) != dataset_identity("folder", image_zip)
    extra = next(folder_copy.rglob("*.png"))
    shutil.copy(extra, extra.with_name("extra.png"))
    assert dataset_identity("folder", folder_copy) != dataset_identity("folder", image_folder)


def test_reference_key_is_the_same_from_training_and_from_evaluate(tiny_config):
    """The trainer reuses its loaded images' identity; evaluate computes it from the config: one cache entry."""
    from gan.eval.reference import build_reference
    cfg = tiny_config(**{"eval.reference": "train"})
    data = load_dataset(cfg.data.source, cfg.data.path, cfg.data.split, resize=cfg.data.resize, progress=False)
    _, from_training = build_reference(cfg, lambda: data)
    load, from_evaluate = build_reference(cfg, progress=False)
    assert from_training == from_evaluate
    assert torch.equal(load(), data.images)


def test_batches_are_in_range_and_deterministic(image_zip):
    images = load_dataset("folder", str(image_zip)).images
    s1 = BatchStream(images, 8, seed=3, hflip=True, device=torch.device("cpu"))
    s2 = BatchStream(images, 8, seed=3, hflip=True, device=torch.device("cpu"))
    x = s1.batch(7)
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, s2.batch(7))
    # Ranks of a data-parallel job split the global batch between them.
    halves = [BatchStream(images, 8, 3, True, torch.device("cpu"), rank=r, world_size=2).batch(7) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)


def _write_fake_cifar(root, n=20):
    """The official python-pickle layout of cifar-10-batches-py, with random pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in names + ["batches.meta"]}


def test_cifar10_loads_through_torchvision_offline(tmp_path, monkeypatch):
    md5 = _write_fake_cifar(tmp_path)
    # torchvision checks the official archive's checksums; point them at the fake files.
    C = torchvision.datasets.CIFAR10
    monkeypatch.setattr(C, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(C, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(C, "meta", {**C.meta, "md5": md5["batches.meta"]})
    monkeypatch.setattr("socket.socket.connect", _no_network)
    data = load_dataset("cifar10", str(tmp_path), "train", download=True)
    assert data.images.shape == (100, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes[0] == "airplane" and data.labels.max() < 10
    assert load_dataset("cifar10", str(tmp_path), "test").images.shape == (20, 3, 32, 32)


def _no_network(*args, **kwargs):
    raise OSError("network is off in tests")


def test_missing_cifar10_offline_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("socket.socket.connect", _no_network)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path / "nowhere"), "train", download=True)
    msg = str(e.value)
    assert "CIFAR-10 not found in" in msg and "nowhere" in msg and "--data" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- training

def _weights(G):
    return {k: v.clone() for k, v in G.state_dict().items()}


def test_short_run_writes_everything(tiny_config):
    cfg = tiny_config()
    summary = Trainer(cfg, progress=False).run()
    run = cfg.resolved_run_dir
    assert summary["step"] == 20
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_0000010.pt", "step_0000020.pt"]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "step_0000000.png", "step_0000010.png", "step_0000020.png"]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10, 15, 20]
    assert {"loss_d", "loss_g", "d_real", "d_fake", "sec_per_step"} <= set(lines[0])
    assert all(np.isfinite(l["loss_d"]) and 0 <= l["d_real"] <= 1 for l in lines)
    assert config_from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    state = torch.load(run / "checkpoints" / "step_0000020.pt", weights_only=True)
    assert state["step"] == 20 and config_from_dict(state["config"]) == cfg


def test_resume_continues_exactly(tiny_config, tmp_path):
    full = tiny_config()
    t = Trainer(full, progress=False)
    t.run()
    expected = _weights(t.G)

    half = tiny_config(run_dir=str(tmp_path / "resumed"))
    resumed = Trainer(half, resume=str(full.resolved_run_dir / "checkpoints" / "step_0000010.pt"), progress=False)
    assert resumed.step == 10
    resumed.run()
    got = _weights(resumed.G)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_resume_auto_and_no_duplicate_steps(tiny_config):
    cfg = tiny_config(**{"train.steps": 10})
    Trainer(cfg, progress=False).run()
    longer = tiny_config(**{"train.steps": 20})
    t = Trainer(longer, resume="auto", progress=False)
    assert t.step == 10
    t.run()
    steps = [json.loads(l)["step"] for l in (cfg.resolved_run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_existing_run_is_not_overwritten_silently(tiny_config):
    cfg = tiny_config(**{"train.steps": 10})
    Trainer(cfg, progress=False).run()
    from gan.core.errors import UserError
    with pytest.raises(UserError, match="already holds a run; pass --resume auto"):
        Trainer(cfg, progress=False)
    assert Trainer(cfg, overwrite=True, progress=False).step == 0


def test_evaluation_without_an_evaluator_fails_at_construction(tiny_config):
    from gan.core.errors import UserError
    cfg = tiny_config(**{"eval.every": 10})
    with pytest.raises(UserError, match="eval.every is 10 but no evaluator") as e:
        Trainer(cfg, progress=False)
    assert "\n" not in str(e.value)
    assert not cfg.resolved_run_dir.exists()  # refused before anything was written or loaded
    made = []
    Trainer(cfg, progress=False, make_evaluator=lambda *args: made.append(args))
    assert made == []  # the evaluator is made at the first evaluation, not before


class _ConstantEvaluator:
    """Stands in for Inception: every evaluation scores the same (keep_evaluated must not depend on FID)."""

    def inception_outputs(self, images, on_device=False):
        return torch.zeros(len(images), 4), None

    def score_features(self, feats, logits=None):
        return {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0}


def test_eval_at_and_keep_evaluated_keep_every_evaluation_checkpoint(tiny_config):
    # Evaluations at 3 (eval.at), every 8 steps, and the last step; checkpoints every 5, newest 2 rotated.
    cfg = tiny_config(**{"train.steps": 20, "eval.every": 8, "eval.at": [3], "ckpt.every": 5, "ckpt.keep": 2,
                         "ckpt.keep_evaluated": True})
    Trainer(cfg, progress=False, make_evaluator=lambda *args: _ConstantEvaluator()).run()
    run = cfg.resolved_run_dir
    evaluated = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "fid" in l]
    assert evaluated == [3, 8, 16, 20]
    kept = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    assert kept == [3, 8, 15, 16, 20]  # every evaluation step, and rotation's newest 2 (15, 20)


def test_eval_at_needs_evaluation_on():
    with pytest.raises(ConfigError, match=r"eval.at = \[1000\] needs eval.every > 0"):
        load_config(None, {"eval.every": 0, "eval.at": [1000]})


def test_ema_generator_is_saved_and_used(tiny_config):
    cfg = tiny_config(**{"train.ema_decay": 0.9, "train.steps": 10})
    t = Trainer(cfg, progress=False)
    t.run()
    assert t.sampler is t.ema.module
    state = torch.load(cfg.resolved_run_dir / "checkpoints" / "step_0000010.pt", weights_only=True)
    assert state["ema"] is not None
    ema_w = state["ema"]["module.net.0.weight"]
    assert not torch.equal(ema_w, state["G"]["net.0.weight"])  # an average lags the live weights


def test_wandb_offline_writes_sample_image(tiny_config, monkeypatch):
    pytest.importorskip("wandb")  # in requirements.txt; without it a run warns (tests/test_faults_io.py)
    monkeypatch.delenv("WANDB_MODE")
    cfg = tiny_config(**{"train.steps": 10, "log.wandb": "offline"})
    Trainer(cfg, progress=False).run()
    wandb_dir = cfg.resolved_run_dir / "wandb"
    runs = list(wandb_dir.glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].rglob("media/images/samples_*.png"))
    assert images, "the sample grid should be logged as a wandb.Image"


@pytest.mark.slow
def test_cli_train_then_evaluate(image_zip, tmp_path):
    run = tmp_path / "cli-run"
    args = ["train", "--config", str(ROOT_CONFIG), "--data", str(image_zip), "--out", str(run),
            "--steps", "4", "--batch-size", "8", "--device", "cpu", "--wandb", "disabled", "--quiet",
            "--set", "model.ngf=8", "--set", "model.ndf=8", "--set", "eval.every=0", "--set", "ckpt.every=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["step"] == 4
    grid = tmp_path / "grid.png"
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(cli, ["evaluate", str(run), "--num-samples", "10", "--grid", str(grid),
                                      "--out", str(out), "--quiet", "--reference", str(image_zip)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["step"] == 4 and metrics["num_samples"] == 10
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and "kid_mean" in metrics
    assert grid.stat().st_size > 0


from tests.conftest import ROOT  # noqa: E402

ROOT_CONFIG = ROOT / "configs" / "default.yaml"
