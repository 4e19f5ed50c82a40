"""The optional extras (gan/eval/extras.py): precision and recall on VGG16 features, FD_DINOv2. Off by default;
offline they cost one line and the other metrics are still reported; with stand-in networks in torch-fidelity's
registry, their numbers are torch-fidelity's own functions' on the same features; and they reach metrics.jsonl,
the evaluate JSON and compare. No test touches the network (conftest refuses connections besides)."""
from __future__ import annotations

import json
import socket
import time
import urllib.error

import pytest
import torch
from click.testing import CliRunner
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from gan.core.config import ConfigError, Config, load_config
from gan.eval import extras, inception, prdc
from gan.eval.inception import InceptionWeights
from gan.eval.metrics import Evaluator

KEYS = ("precision_vgg16", "recall_vgg16", "fd_dinov2")
BOTH = ("vgg16_prc", "fd_dinov2")
REAL_TORCH_LOAD = torch.load


def _block_features(images: torch.Tensor) -> torch.Tensor:
    """12 features of uint8 images (N,3,H,W): each channel's sums over 2x2 blocks (integers: exact in float32
    whatever the batching), then fixed elementwise maps, so that no two distances tie."""
    n, c, h, w = images.shape
    s = images.float().reshape(n, c, 2, h // 2, 2, w // 2).sum((3, 5)).flatten(1)
    scale = torch.linspace(0.5, 1.7, s.shape[1])
    return torch.sin(s * scale / 997.0) * 3 + s / 4096.0


class _InceptionStandIn(torch.nn.Module):
    def forward(self, images):
        return (_block_features(images)[:, :8],)


def _stand_in(real: type) -> type:
    """A torch-fidelity extractor with `real`'s name, feature names and default layers, computing
    _block_features; it records what the loading context was."""

    class StandIn(FeatureExtractorBase):
        built: list = []
        get_provided_features_list = staticmethod(real.get_provided_features_list)
        get_default_feature_layer_for_metric = staticmethod(real.get_default_feature_layer_for_metric)

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            StandIn.built.append({"name": name, "features": list(features_list),
                                  "weights_only_load": torch.load is not REAL_TORCH_LOAD,
                                  "timeout": socket.getdefaulttimeout()})

        def forward(self, x):
            assert x.dtype == torch.uint8
            return tuple(_block_features(x) for _ in self.features_list)
    return StandIn


@pytest.fixture
def fresh(monkeypatch):
    """Nothing remembered as unavailable from another test."""
    monkeypatch.setattr(extras, "_unavailable", set())


@pytest.fixture
def stand_ins(monkeypatch, fresh):
    made = {"vgg16": _stand_in(FeatureExtractorVGG16), "dinov2-vit-l-14": _stand_in(FeatureExtractorDinoV2)}
    for name, cls in made.items():
        monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, name, cls)
    return made


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty torch hub cache: nothing cached, so a load must download."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def _images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _evaluator(tmp_path, real, extra_keys=(), reference=None, **kw) -> Evaluator:
    ev = Evaluator(InceptionWeights(path="unused", identity="blocks", has_head=False), torch.device("cpu"),
                   reference or (lambda: real), "blocks-ref", cache_dir=str(tmp_path / "cache"), verbose=False,
                   extras=extra_keys, **kw)
    ev._model = _InceptionStandIn()
    return ev


# ---------------------------------------------------------------- off by default, and the config keys

def test_off_by_default_nothing_is_attempted(tmp_path, monkeypatch, fresh):
    tried = []
    monkeypatch.setattr(extras, "create_feature_extractor", lambda *a, **k: tried.append(a))
    assert extras.requested(Config().metrics) == ()
    ev = _evaluator(tmp_path, _images(20, 0))
    out = ev.score(_images(12, 1))
    assert not set(KEYS) & set(out) and "fid" in out and "precision" in out
    assert tried == [] and not any("-vgg16-" in p.name or "dinov2" in p.name for p in (tmp_path / "cache").iterdir())


def test_config_keys(tiny_config):
    assert {k: getattr(Config().metrics, k) for k in BOTH} == {"vgg16_prc": False, "fd_dinov2": False}
    assert set(extras.EXTRAS) == set(BOTH)  # every extra has its metrics.<key>
    cfg = tiny_config(**{"metrics.vgg16_prc": True, "metrics.fd_dinov2": True})
    assert extras.requested(cfg.metrics) == BOTH
    with pytest.raises(ConfigError, match=r"metrics.fd_dinov2 = 'yes' is not valid; expected bool"):
        load_config(None, {"metrics.fd_dinov2": "yes"})
    with pytest.raises(ConfigError, match=r"unknown key 'metrics.fd_dino'"):
        load_config(None, {"metrics.fd_dino": True})
    with pytest.raises(ValueError, match="unknown extra metric"):
        _evaluator(tiny_config().resolved_run_dir, _images(4, 0), ("fid_dinov2",))


# ---------------------------------------------------------------- offline: one line each, the rest reported

def _offline_urlopen(calls):
    def urlopen(*args, **kwargs):
        calls.append(socket.getdefaulttimeout())
        raise urllib.error.URLError(OSError("Name or service not known"))
    return urlopen


@pytest.mark.parametrize("allow_download", [True, False])
def test_offline_each_extra_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys, fresh, no_hub,
                                                             allow_download):
    """torch-fidelity's real extractors, with torch hub's cache empty and the network down (or downloads off)."""
    calls = []
    monkeypatch.setattr(torch.hub, "urlopen", _offline_urlopen(calls))
    ev = _evaluator(tmp_path, _images(20, 0), BOTH, allow_download=allow_download)
    capsys.readouterr()
    first = ev.score(_images(12, 1))
    second = ev.score(_images(12, 2))
    captured = capsys.readouterr()
    why = "offline?" if allow_download else "not cached, and metrics.allow_download is false"
    assert captured.err.splitlines() == [
        f"VGG16 precision/recall unavailable: could not fetch torchvision's VGG16 weights ({why})",
        f"FD_DINOv2 unavailable: could not fetch the DINOv2 weights ({why})"]
    assert captured.out == ""
    for out in (first, second):
        assert {"fid", "kid_mean", "precision", "recall", "density", "coverage"} <= set(out)
        assert not set(KEYS) & set(out)
    # Downloads were tried (torchvision tries twice; torch hub first asks GitHub for the repository's
    # branch), each under the Inception download's timeout; with downloads off, never.
    assert calls == ([inception.DOWNLOAD_TIMEOUT] * len(calls) if allow_download else [])
    assert len(calls) >= (2 if allow_download else 0)
    assert socket.getdefaulttimeout() is None and torch.hub.urlopen is not extras._refuse_download
    # A second Evaluator in this process does not try again, nor say it again.
    calls.clear()
    _evaluator(tmp_path, _images(20, 0), BOTH, allow_download=allow_download).score(_images(12, 1))
    assert calls == [] and capsys.readouterr().err == ""


def test_a_hanging_network_costs_the_download_timeout_not_a_hang(monkeypatch, capsys, fresh, no_hub,
                                                                  silent_server):
    port, accepted = silent_server
    real_urlopen = torch.hub.urlopen
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: real_urlopen(f"http://127.0.0.1:{port}/"))
    monkeypatch.setattr(inception, "DOWNLOAD_TIMEOUT", 0.5)
    t0 = time.monotonic()
    model = extras.load_extractor(extras.EXTRAS["fd_dinov2"], torch.device("cpu"), True, verbose=True)
    assert model is None and len(accepted) == 1
    assert time.monotonic() - t0 < 10
    assert capsys.readouterr().err.splitlines() == [
        "FD_DINOv2 unavailable: could not fetch the DINOv2 weights (offline?)"]


@pytest.mark.parametrize("error, why", [
    (KeyError("classifier.6.weight"), "KeyError: 'classifier.6.weight'"),
    (urllib.error.HTTPError("https://example.org/w.pth", 404, "Not Found", None, None),  # online, but no file
     "HTTPError: HTTP Error 404: Not Found")])
def test_a_load_failing_otherwise_says_why(monkeypatch, capsys, fresh, error, why):
    def broken(*args, **kwargs):
        raise error
    monkeypatch.setattr(extras, "create_feature_extractor", broken)
    assert extras.load_extractor(extras.EXTRAS["vgg16_prc"], torch.device("cpu"), True, verbose=False) is None
    assert capsys.readouterr().err == (f"VGG16 precision/recall unavailable: could not load torchvision's VGG16 "
                                       f"weights ({why})\n")


# ---------------------------------------------------------------- the numbers: torch-fidelity's, same features

def test_extras_equal_torch_fidelitys_functions_on_the_same_features(tmp_path, stand_ins):
    real_images, fake_images = _images(40, 0), _images(30, 1)
    ev = _evaluator(tmp_path, real_images, BOTH, allow_download=False)
    out = ev.score(fake_images)
    real, fake = _block_features(real_images).double(), _block_features(fake_images).double()

    fd = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), verbose=False)
    assert out["fd_dinov2"] == pytest.approx(fd[KEY_METRIC_FID], rel=1e-6, abs=1e-9)
    assert out["fd_dinov2"] > 0.1
    # Precision and recall against the reference subset the Inception metrics use, as large as the fakes.
    subset = real[prdc.reference_subset(40, 30)]
    pr = prc_features_to_metric(fake, subset, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                verbose=False)
    assert out["precision_vgg16"] == pytest.approx(pr[KEY_METRIC_PRECISION], abs=1e-6)
    assert out["recall_vgg16"] == pytest.approx(pr[KEY_METRIC_RECALL], abs=1e-6)
    assert 0 < out["precision_vgg16"] < 1 and 0 < out["recall_vgg16"] < 1

    # Built from torch-fidelity's registry, with the layer it uses for the metric, under weights-only loads;
    # with downloads off, no socket timeout was set.
    vgg, = stand_ins["vgg16"].built
    dino, = stand_ins["dinov2-vit-l-14"].built
    assert vgg["features"] == ["fc2_relu"] and dino["features"] == ["dinov2"]
    assert vgg["weights_only_load"] and dino["weights_only_load"] and vgg["timeout"] is None

    # The reference side is cached per extractor: a new Evaluator scores the same without the real images.
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.endswith("-vgg16-fc2_relu.pt") for n in names)
    assert any(n.endswith("-dinov2-vit-l-14-dinov2.pt") for n in names)

    def no_images():
        raise AssertionError("the reference images were read although cached")
    again = _evaluator(tmp_path, real_images, BOTH, reference=no_images)
    again._ref = ev._ref  # the Inception side's cache is tested elsewhere
    assert {k: again.score(fake_images)[k] for k in KEYS} == {k: out[k] for k in KEYS}
    # The same images score FD 0 (up to rounding) and full precision and recall.
    same = _evaluator(tmp_path / "same", real_images, BOTH).score(real_images)
    assert abs(same["fd_dinov2"]) < 1e-6 and same["precision_vgg16"] == same["recall_vgg16"] == 1.0


def test_too_few_images_for_knn_skip_precision_and_recall_only(tmp_path, stand_ins):
    out = _evaluator(tmp_path, _images(20, 0), BOTH).score(_images(prdc.K_DENSITY_COVERAGE, 1))
    assert "fd_dinov2" in out and "precision_vgg16" not in out


def test_gathered_features_concatenate_with_their_extras():
    from gan.core.train import _concat
    parts = [(torch.ones(2, 3), None, {"fd_dinov2": torch.ones(2, 4)}),
             (torch.zeros(1, 3), None, {"fd_dinov2": torch.zeros(1, 4)})]
    feats, logits, extra = (_concat([p[i] for p in parts]) for i in range(3))
    assert feats.shape == (3, 3) and logits is None and extra["fd_dinov2"].shape == (3, 4)


# ---------------------------------------------------------------- where the numbers go

def test_training_logs_them_and_evaluate_reports_them(tiny_config, monkeypatch, stand_ins):
    from cli import cli
    from gan.core.train import Trainer
    from gan.eval.evaluate import evaluate_checkpoint
    monkeypatch.setattr(inception, "resolve_inception_weights",
                        lambda *a, **k: InceptionWeights(path="unused", identity="blocks", has_head=False))
    monkeypatch.setattr(Evaluator, "model", property(lambda self: _InceptionStandIn()))
    cfg = tiny_config(**{"eval.every": 10, "train.steps": 10, "metrics.vgg16_prc": True,
                         "metrics.fd_dinov2": True})
    Trainer(cfg, progress=False, make_evaluator=Evaluator.from_config).run()
    records = [json.loads(l) for l in (cfg.resolved_run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "fid" in r]
    assert evaluated and all(set(KEYS) <= set(r) for r in evaluated)

    # evaluate: the run's config, and the flags turning extras on besides.
    off = tiny_config(**{"eval.every": 0, "train.steps": 2, "ckpt.every": 2,
                         "run_dir": cfg.resolved_run_dir.parent / "off"})
    Trainer(off, progress=False).run()
    run = str(off.resolved_run_dir)
    assert not set(KEYS) & set(evaluate_checkpoint(run, 8, "cpu", None, None, progress=False))
    result = CliRunner().invoke(cli, ["evaluate", run, "--num-samples", "8", "--device", "cpu", "--quiet",
                                      "--fd-dinov2"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert "fd_dinov2" in got and "precision_vgg16" not in got


def _write_run(root, name, seed, evals: dict):
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config(None, {"train.seed": seed, "run_dir": str(run), "train.steps": max(evals), "eval.every": 1000})
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train_time": s * 0.1, "fid": 50.0, **m}) + "\n" for s, m in evals.items()))


def test_compare_takes_the_new_keys_with_their_direction(tmp_path):
    from cli import compare
    from gan.tools.compare import METRICS, compare_runs
    choices = next(p for p in compare.params if p.name == "metric").type.choices
    assert list(choices) == list(METRICS)
    for seed in (0, 1):
        _write_run(tmp_path / "runs", f"bn-s{seed}", seed, {
            1000: {"fd_dinov2": 900.0, "precision_vgg16": 0.2, "recall_vgg16": 0.1},
            2000: {"fd_dinov2": 600.0, "precision_vgg16": 0.5, "recall_vgg16": 0.3},
            3000: {"fd_dinov2": 700.0, "precision_vgg16": 0.4, "recall_vgg16": 0.2}})
    for metric, best, higher, title in (("fd_dinov2", 600.0, False, "# FD_DINOv2"),
                                        ("precision_vgg16", 0.5, True, "# precision_vgg16"),
                                        ("recall_vgg16", 0.3, True, "# recall_vgg16")):
        result = compare_runs([tmp_path / "runs"], tmp_path / "out", metric=metric)
        assert result.data["higher_is_better"] is higher
        assert result.data["groups"][0]["best"]["mean"] == pytest.approx(best)
        assert result.markdown.startswith(title)
