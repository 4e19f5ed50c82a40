"""Shared fixtures: tiny datasets made on the fly, configs for runs that take seconds on a CPU, a network that hangs."""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """Caches (Inception weights, reference statistics) and wandb stay inside the test session."""
    home = tmp_path_factory.mktemp("torch_home")
    old = {k: os.environ.get(k) for k in ("TORCH_HOME", "WANDB_MODE", "WANDB_SILENT")}
    os.environ["TORCH_HOME"] = str(home)
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["WANDB_SILENT"] = "true"
    # Tiny tensors gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting
    # for each other slowed steps 5-100x.
    torch.set_num_threads(1)
    # Tests never touch the network: connections anywhere but this machine fail at once (in this process;
    # the runs tests start as subprocesses set metrics.allow_download false and wandb disabled).
    real_connect = socket.socket.connect

    def local_only(sock, address, *args):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(host):
            raise OSError(f"tests do not use the network (connect to {address!r})")
        return real_connect(sock, address, *args)
    socket.socket.connect = local_only
    yield
    socket.socket.connect = real_connect
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Structured uint8 images (colour blobs on gradients), so GANs and Inception see more than noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    colours = torch.rand(n, 3, 1, 1, generator=g)
    centres = torch.rand(n, 2, 1, 1, generator=g)
    dist = (xx - centres[:, :1]) ** 2 + (yy - centres[:, 1:]) ** 2
    blob = torch.exp(-dist / 0.02)
    img = 0.3 * yy + 0.7 * blob * colours + 0.05 * torch.rand(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def write_image_folder(root: Path, n_per_class: int = 24, classes=("cats", "dogs"), size: int = 32) -> Path:
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(make_images(n_per_class, seed=c, size=size)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="session")
def image_zip(image_folder, tmp_path_factory) -> Path:
    """Same images as `image_folder`, zipped the way the shared CIFAR-10 copy is: train/<class>/*.png."""
    path = tmp_path_factory.mktemp("zips") / "tiny.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(image_folder.rglob("*.png")):
            zf.write(f, f"train/{f.relative_to(image_folder)}")
    return path


def tiny_overrides(data: Path, run_dir: Path, **extra) -> dict:
    """A DCGAN small enough that 20 CPU steps take a second or two."""
    o = {
        "run_dir": str(run_dir), "data.source": "folder", "data.path": str(data),
        "model.ngf": 8, "model.ndf": 8, "model.z_dim": 16,
        "train.steps": 20, "train.batch_size": 8, "train.device": "cpu",
        "eval.every": 0, "eval.num_samples": 16, "eval.batch_size": 16,
        "log.every": 5, "log.sample_every": 10, "log.wandb": "disabled",
        "ckpt.every": 10, "ckpt.keep": 5, "metrics.allow_download": False,
    }
    o.update(extra)
    return o


@pytest.fixture
def tiny_config(image_zip, tmp_path):
    """`tiny_config(**overrides)` -> a validated Config for a seconds-long CPU run in tmp_path/run."""
    from gan.core.config import load_config

    def make(**extra):
        run_dir = extra.pop("run_dir", tmp_path / "run")
        return load_config(None, tiny_overrides(image_zip, run_dir, **extra))
    return make


@pytest.fixture
def torch_seed0():
    """torch's global RNG seeded with 0 before the test (the MN tests: `pytestmark = usefixtures(...)`)."""
    torch.manual_seed(0)


# ---------------------------------------------------------------- helpers several test files share

def set_args(overrides: dict) -> list[str]:
    """The `--set key=value` options that give a CLI command these overrides."""
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def train_args(data, run, *extra) -> list[str]:
    """`cli train` arguments (for CliRunner) of a quiet tiny_overrides() run without wandb, then `extra`."""
    return ["train", "--wandb", "disabled", "--quiet", *set_args(tiny_overrides(data, run)), *extra]


def output_lines(text: str) -> list[str]:
    """A command's output without its blank lines."""
    return [l for l in text.splitlines() if l.strip()]


def logged_steps(run: Path) -> list[int]:
    """The steps of the run's metrics.jsonl lines, skipping a line a kill cut short."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line a kill cut short
    return steps


def assert_same(a, b, where: str = "state") -> None:
    """Tensors equal bit for bit, everything else equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def training_state(state: dict) -> dict:
    """What must match between an interrupted-and-resumed run and an uninterrupted one."""
    return {k: state[k] for k in ("step", "G", "D", "opt_g", "opt_d", "ema", "rng", "history", "best")}


def fake_wandb(monkeypatch, fail_log: bool = False) -> list:
    """wandb.init returns a stand-in run; returns a list that gets True when finish() is called.
    Skips the test where wandb is not installed (it is in requirements.txt, but a machine may lack it)."""
    wandb = pytest.importorskip("wandb")
    finished: list = []

    class FakeRun:
        summary: dict = {}

        def log(self, values, step=None):
            if fail_log:
                raise OSError(errno.EIO, "wandb's disk went away")

        def finish(self):
            finished.append(True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    return finished


# ---------------------------------------------------------------- the fault suite's summary line

# marker -> [passed, run, skipped]; tests/test_faults_*.py mark their tests `fault`, tests/test_bad_input.py
# `bad_input`. A skip (wandb not installed, say) is neither survived nor failed: it is counted apart.
_FAULT_TALLY = {"fault": [0, 0, 0], "bad_input": [0, 0, 0]}


def assert_k1_is_batchnorm(mn, bn, shape, fmt, tol: dict) -> None:
    """MN with K = 1 against BatchNorm with the same affine parameters, both float64: four training steps
    (outputs, input and affine gradients), then running statistics and one eval-mode step."""
    for _ in range(4):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).contiguous(memory_format=fmt)
        xb, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
        yb, ym = bn(xb), mn(xm)
        (yb * g).sum().backward()
        (ym * g).sum().backward()
        torch.testing.assert_close(ym, yb, **tol)
        torch.testing.assert_close(xm.grad, xb.grad, **tol)
        torch.testing.assert_close(mn.weight.grad, bn.weight.grad, **tol)
        torch.testing.assert_close(mn.bias.grad, bn.bias.grad, **tol)
    torch.testing.assert_close(mn.running_E[0], bn.running_mean, **tol)
    torch.testing.assert_close(mn.running_V[0], bn.running_var, **tol)
    assert int(mn.num_batches_tracked) == int(bn.num_batches_tracked) == 4

    bn.eval(), mn.eval()
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).contiguous(memory_format=fmt)
    xb, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    yb, ym = bn(xb), mn(xm)
    yb.sum().backward(), ym.sum().backward()
    torch.testing.assert_close(ym, yb, **tol)
    torch.testing.assert_close(xm.grad, xb.grad, **tol)


def assert_trains_finite(m, x, steps: int = 5) -> None:
    """`steps` training forwards and backwards of the MN layer m on x: outputs, gradients and the mixture's
    variances stay finite (variances positive)."""
    for _ in range(steps):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xi.grad).all()
    assert torch.isfinite(m.gmm_sigma2).all() and (m.gmm_sigma2 > 0).all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    kind = next((k for k in _FAULT_TALLY if item.get_closest_marker(k)), None)
    # Counted once: at the call, or at a setup that failed and so had no call.
    if kind is not None and (report.when == "call" or (report.when == "setup" and not report.passed)):
        tally = _FAULT_TALLY[kind]
        if report.skipped:
            tally[2] += 1
        else:
            tally[0] += report.passed
            tally[1] += 1
    return report


def pytest_terminal_summary(terminalreporter):
    def part(what, ok, run, skipped):
        return f"{what}: {ok}/{run}" + (f" ({skipped} skipped)" if skipped else "")
    (f_ok, f_run, f_skip), (b_ok, b_run, b_skip) = _FAULT_TALLY["fault"], _FAULT_TALLY["bad_input"]
    if f_run or b_run or f_skip or b_skip:
        terminalreporter.write_line(part("faults survived", f_ok, f_run, f_skip) + ", "
                                    + part("bad inputs rejected", b_ok, b_run, b_skip))


@pytest.fixture
def quick_check(request) -> bool:
    """Whether this is the contributor's quick check (`-m "not slow"`): property sweeps then draw fewer examples,
    and the full suite (CI) all of them."""
    return "not slow" in (request.config.option.markexpr or "")


@pytest.fixture
def silent_server():
    """A local TCP server that accepts connections and never answers: a network that hangs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)
    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], accepted
    srv.close()
    for c in accepted:
        c.close()
