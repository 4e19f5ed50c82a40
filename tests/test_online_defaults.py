"""Defaults for a user who is online, tested without the network: the one weights download try and its
fallback, wandb's auto mode, and Inception weights stored in half precision."""
from __future__ import annotations

import socket
import time

import pytest
import torch

from gan.eval import inception
from gan.core import tracking
from gan.eval.inception import resolve_inception_weights
from gan.eval.metrics import Evaluator
from tests.conftest import make_images


# ---------------------------------------------------------------- the weights download

def test_a_hanging_network_falls_back_to_the_conversion_within_seconds(tmp_path, monkeypatch, silent_server, capsys):
    port, accepted = silent_server
    cache = str(tmp_path / "cache")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # torch-fidelity's file is not cached
    converted = resolve_inception_weights(None, cache, allow_download=False)  # the fallback, made beforehand
    monkeypatch.setattr(inception, "URL_INCEPTION_V3", f"http://127.0.0.1:{port}/weights-inception.pth")
    monkeypatch.setattr(inception, "DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.setattr(inception, "_download_failed", False)
    capsys.readouterr()
    t0 = time.monotonic()
    got = resolve_inception_weights(None, cache, allow_download=True)
    took = time.monotonic() - t0
    assert got == converted and not got.has_head
    assert len(accepted) == 1  # it did try, once
    assert took < 10  # the 0.5 s timeout, not a hang (the server never answers)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Inception weights: the download failed")
    assert socket.getdefaulttimeout() is None  # the process's default is restored

    # Not tried again: neither in this process, nor (for a day) by the next one, which reads the marker.
    resolve_inception_weights(None, cache, allow_download=True)
    monkeypatch.setattr(inception, "_download_failed", False)
    resolve_inception_weights(None, cache, allow_download=True)
    assert len(accepted) == 1
    assert (tmp_path / "cache" / "inception-download-failed").is_file()


def test_the_config_allows_the_download_and_the_tests_do_not(tiny_config):
    from gan.core.config import Config
    assert Config().metrics.allow_download is True
    assert tiny_config().metrics.allow_download is False


# ---------------------------------------------------------------- wandb: auto

@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_wandb_auto_is_offline_without_credentials(no_wandb_env):
    mode, why = tracking.resolve_wandb_mode(None, "auto")
    assert mode == "offline" and "no WANDB_API_KEY or stored `wandb login`" in why


def test_wandb_auto_is_online_with_an_api_key(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_wandb_mode(None, "auto") == ("online", "log.wandb=auto and WANDB_API_KEY is set")


def test_wandb_auto_is_online_with_a_stored_login(no_wandb_env, monkeypatch):
    no_wandb_env.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    no_wandb_env.chmod(0o600)
    mode, why = tracking.resolve_wandb_mode(None, "auto")
    assert mode == "online" and "stored wandb login" in why
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a login for another server does not count
    assert tracking.resolve_wandb_mode(None, "auto")[0] == "offline"


def test_wandb_flag_beats_env_beats_config(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_wandb_mode("offline", "auto") == ("offline", "--wandb=offline")
    assert tracking.resolve_wandb_mode(None, "online") == ("disabled", "WANDB_MODE=disabled")
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.resolve_wandb_mode(None, "online") == ("online", "log.wandb=online")


def test_a_run_says_which_wandb_mode_it_chose_and_why(no_wandb_env, tiny_config, monkeypatch, capsys):
    from gan.core.train import Trainer
    started = []
    monkeypatch.setattr(tracking.RunLogger, "_start_wandb", lambda self, c, mode, p: started.append(mode))
    Trainer(tiny_config(**{"log.wandb": "auto"}), progress=False)
    err = capsys.readouterr().err
    assert "wandb: offline (log.wandb=auto and no WANDB_API_KEY" in err and started == ["offline"]


# ---------------------------------------------------------------- half-precision weights

@pytest.mark.slow
def test_half_precision_weights_give_the_same_fid_within_a_tenth_of_a_percent(tmp_path):
    """An fp16-rounded copy of the weights (half the file to copy to an offline GPU node), upcast on load.

    Rounding every weight to 11 significant bits moves each feature by ~1e-3 of its size, and FID
    between two clearly different sets by a few hundredths of a percent (measured once on 300 vs 300
    JPEG CIFAR-10 images: 99.7506 vs 99.7178, 0.03 %); 0.1 % leaves room for the image sets, not for
    a loading bug, which would move FID by far more (e.g. weights left in fp16, or BN statistics lost)."""
    full = resolve_inception_weights(None, None, allow_download=False)
    sd = torch.load(full.path, map_location="cpu", weights_only=True)
    half_path = tmp_path / "inception-fp16.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, half_path)
    half = resolve_inception_weights(str(half_path), None)
    real, fake = make_images(100, seed=5), make_images(100, seed=6)
    fids = []
    for w in (full, half):
        ev = Evaluator(w, torch.device("cpu"), lambda: real, "fp16-check", cache_dir=str(tmp_path / w.identity),
                       verbose=False)
        assert all(p.dtype == torch.float32 for p in ev.model.parameters())  # upcast, computed in fp32
        fids.append(ev.score(fake)["fid"])
    assert fids[0] > 1.0  # two different sets: a relative comparison means something
    assert abs(fids[1] - fids[0]) <= 1e-3 * fids[0], fids
