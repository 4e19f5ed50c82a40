"""MixtureNorm2d (models/mixture_norm.py) in training: its state resumes exactly, it runs under bfloat16
autocast, and generators built with it train. The layer's maths: tests/test_mixture_norm.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.mixture_norm import MixtureNorm2d
from tests.test_mixture_norm import train_steps

pytestmark = pytest.mark.usefixtures("torch_seed0")


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


def test_state_dict_roundtrip_and_exact_resume(tmp_path):
    a = train_steps(MixtureNorm2d(6))
    path = tmp_path / "mn.pt"
    torch.save(a.state_dict(), path)
    b = MixtureNorm2d(6)
    b.load_state_dict(torch.load(path, weights_only=True))
    keys = set(a.state_dict())
    assert {"weight", "bias", "gmm_lambda", "gmm_mu", "gmm_sigma2", "initialized", "dead_count",
            "running_lambda", "running_mu", "running_sigma2", "running_E", "running_V",
            "num_batches_tracked"} <= keys
    x = torch.randn(8, 6, 5, 5)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # Resume: the same RNG state gives the same training step (subsampling included).
    a.train(), b.train()
    x = torch.randn(64, 6, 16, 16)  # 16384 samples > em_samples: EM subsamples
    torch.manual_seed(1)
    ya = a(x)
    torch.manual_seed(1)
    yb = b(x)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------------------
# Mixed precision, training
# --------------------------------------------------------------------------------------


def test_autocast_bfloat16():
    conv, m = nn.Conv2d(3, 8, 3, padding=1), MixtureNorm2d(8)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = m(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(m.weight.grad).all()
    # Statistics are float32: the bf16 output is a float32 run on the same input, rounded once to
    # bfloat16 (the same float32 operations on the same values), so within bfloat16's unit roundoff
    # 2**-8 of it, relatively, on any processor.
    y32 = MixtureNorm2d(8)
    y32.load_state_dict(m.state_dict())
    m.eval(), y32.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf = m(h.detach())
    u_bf16 = torch.finfo(torch.bfloat16).eps / 2
    torch.testing.assert_close(y_bf.float(), y32(h.detach().float()), atol=0, rtol=u_bf16)


class MiniGenerator(nn.Module):
    def __init__(self, z_dim=16, width=16, k=3):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, 4 * width, 4, 1, 0, bias=False), MixtureNorm2d(4 * width, k), nn.ReLU(True),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1, bias=False), MixtureNorm2d(2 * width, k), nn.ReLU(True),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), MixtureNorm2d(width, k), nn.ReLU(True),
            nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z[:, :, None, None])


def _train_gan(G: nn.Module, z_dim: int, steps: int) -> None:
    D = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 16, 4, 2, 1),
                      nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(16 * 8 * 8, 1))
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    real = torch.rand(16, 3, 32, 32) * 2 - 1
    before = [p.detach().clone() for p in G.parameters()]
    bce = nn.functional.binary_cross_entropy_with_logits
    for _ in range(steps):
        fake = G(torch.randn(16, z_dim))
        assert torch.isfinite(fake).all()
        d_loss = bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
        opt_d.zero_grad(), d_loss.backward(), opt_d.step()
        g_loss = bce(D(fake), torch.ones(16, 1))
        opt_g.zero_grad(), g_loss.backward(), opt_g.step()
        assert torch.isfinite(g_loss) and torch.isfinite(d_loss)
        assert all(torch.isfinite(p.grad).all() for p in G.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, G.parameters()))
    G.eval()
    with torch.no_grad():
        assert torch.isfinite(G(torch.randn(16, z_dim))).all()
        assert torch.isfinite(G(torch.randn(1, z_dim))).all()
    G.train()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_mini_dcgan_trains(fmt):
    G = MiniGenerator().to(memory_format=fmt)
    _train_gan(G, 16, steps=20)
    mns = [m for m in G.modules() if isinstance(m, MixtureNorm2d)]
    assert all(int(m.num_batches_tracked) == 20 for m in mns)
    assert all(torch.isfinite(m.running_V).all() and torch.isfinite(m.running_mu).all() for m in mns)


def test_project_generator_with_mn_trains():
    from models.dcgan import Generator, dcgan_init

    G = Generator(z_dim=16, ngf=8, norm="mn")
    dcgan_init(G)
    assert sum(isinstance(m, MixtureNorm2d) for m in G.modules()) == 3
    _train_gan(G, 16, steps=5)


# --------------------------------------------------------------------------------------
# Kernels per step
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("posteriors", ["joint", "per_channel"])
def test_mn_layers_add_a_bounded_number_of_ops_whatever_the_width_and_components(posteriors):
    """On a GPU every aten op costs about one kernel launch, and at DCGAN sizes launches bound a step, so MN's op
    count is its cost there. One steady-state forward and backward of the project's generator (3 MN layers)
    against the BN one: at most 155 more ops per MN layer (the K components as batched tensors, each E-step and
    all of a step's sufficient statistics one product apiece, the running buffers moved by one call), no host
    sync, and the same count at any width and any K: no Python loop over channels or components."""
    from gan.tools.op_count import generator_ops
    from models.dcgan import Generator, dcgan_init

    def ops(norm, ngf=16, k=3):
        G = Generator(z_dim=16, ngf=ngf, norm=norm, mn_options={"num_components": k, "posteriors": posteriors})
        dcgan_init(G)
        return generator_ops(G)

    bn, mn = ops("bn"), ops("mn")
    assert bn.syncs == mn.syncs == 0
    assert mn.ops - bn.ops <= 3 * 155, mn.by_op
    assert ops("mn", ngf=8).ops == ops("mn", k=2).ops == ops("mn", k=5).ops == mn.ops


@pytest.mark.slow  # compiles two generators: about 20 s on 2 cores with a cold cache
def test_compiled_mn_layers_add_few_generated_kernels():
    """Under torch.compile Inductor fuses MN's small per-component ops: one compiled forward and backward of the
    generator at width 8 (each generated kernel one launch on a GPU; library GEMMs and convolutions come beside
    them) has at most 35 more generated kernels per MN layer than the BN one (about 28 with Inductor's CPU code),
    against over 100 aten ops per layer in eager mode."""
    from gan.tools.op_count import compiled_generator_kernels
    from models.dcgan import Generator

    def kernels(norm):
        torch.manual_seed(0)
        return compiled_generator_kernels(Generator(z_dim=16, ngf=8, norm=norm))

    bn, mn = kernels("bn"), kernels("mn")
    assert 0 < bn < mn <= bn + 3 * 35
