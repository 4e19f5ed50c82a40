"""torch.compile on the CPU (inductor): MN's steady-state step is one graph, with no host sync and no
graph break, and a compiled run trains what an eager run trains (float64, to 1e-10). The CUDA graphs of
compile_mode reduce-overhead exist only on a GPU: tests/test_cuda.py runs them.

Compiling costs tens of seconds on a 2-core CPU, so this file compiles few, small models, and all of it is
marked slow.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from gan.core.train import Trainer
from models.mixture_norm import MixtureNorm2d

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_an_initialized_mixture_norm_compiles_into_one_graph(fresh_dynamo):
    """fullgraph=True refuses any graph break (a .item(), a data-dependent Python branch) in the
    steady-state forward, training and eval alike. Float64, so compiled == eager to 1e-10."""
    torch.manual_seed(0)
    layer = MixtureNorm2d(6).double()
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64)
    layer(x)  # the first step fits the mixture (eagerly)
    eager, compiled = layer, copy.deepcopy(layer)
    compiled.compile(fullgraph=True)  # in place: the same state_dict keys
    for training in (True, False):
        eager.train(training), compiled.train(training)
        for i in range(2):
            xi = torch.randn(8, 6, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) * 2 + 1
            torch.manual_seed(10 + i)  # EM's subsampling draws from the global RNG: the same draws for both
            want = eager(xi)
            torch.manual_seed(10 + i)
            got = compiled(xi)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, b in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], b, rtol=1e-10, atol=1e-10)
    assert not fresh_dynamo["graph_break"]


def _run(tiny_config, tmp_path, norm: str, compile: bool) -> Trainer:
    """4 steps in float64 (the models, the data, the losses), with an EMA generator."""
    cfg = tiny_config(**{"model.norm": norm, "train.compile": compile, "train.compile_mode": "reduce-overhead",
                         "train.ema_decay": 0.9, "train.steps": 4, "log.every": 1, "log.sample_every": 0,
                         "ckpt.every": 4, "run_dir": tmp_path / f"{norm}-{compile}"})
    torch.set_default_dtype(torch.float64)
    try:
        t = Trainer(cfg, progress=False)
        t.run()
    finally:
        torch.set_default_dtype(torch.float32)
    return t


@pytest.mark.parametrize("norm", ["bn", "mn"])
def test_a_compiled_run_equals_an_eager_one_and_compiles_once(tiny_config, tmp_path, norm, fresh_dynamo,
                                                              monkeypatch):
    """4 steps compiled (compile_mode reduce-overhead: CUDA graphs on a GPU, the same compiled code without
    them here) vs eager, from the same seed, in float64.

    - Compile once: G one graph; D two, since its input needs no gradient in the discriminator's update and
      does in the generator's (a guard on requires_grad); no graph break. Sampling runs eagerly.
    - Every compiled step marks its start for CUDA graphs (gan/core/device.py, begin_compiled_step).
    - Losses, weights, buffers and the EMA generator agree to 1e-10: the compiled code sums in another
      order (float64 reassociation, ~1e-16 relative per reduction), which 3 Adam steps do not grow past
      1e-12; a graph that computed something else (eval-mode normalization, a skipped statistics update,
      G's output read after it was overwritten) is off by far more.
    - Checkpoints hold the same keys with and without compile (compiled in place, no `_orig_mod.`)."""
    marks = []
    mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: (marks.append(1), mark())[1])
    compiled = _run(tiny_config, tmp_path, norm, True)
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    assert fresh_dynamo["stats"]["unique_graphs"] == 3
    assert len(marks) == 4
    eager = _run(tiny_config, tmp_path, norm, False)
    assert len(marks) == 4
    losses = []
    for t in (compiled, eager):
        rows = [json.loads(l) for l in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append(torch.tensor([[r["loss_d"], r["loss_g"]] for r in rows if "loss_d" in r],
                                   dtype=torch.float64))
    assert losses[0].shape == (4, 2)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for part in ("G", "D", "ema"):
        got, want = (getattr(t, part) if part != "ema" else t.ema for t in (compiled, eager))
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            assert a.dtype == b.dtype and (a.dtype != torch.float32), (part, name, a.dtype)
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{part}.{name}: {m}")
    keys = [set(torch.load(t.run_dir / "checkpoints" / "step_0000004.pt", weights_only=True)["G"]) for t in
            (compiled, eager)]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[0])
