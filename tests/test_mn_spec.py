"""The layer against the spec: MixtureNorm2d equals tests/mn_spec.py (the formulas of
docs/mixture-normalization.md, written without models/) in float64, forward and backward, training and eval.

A warm training step starts from a stored mixture that the test sets, so that the spec's EM can start from
the same one; a fresh fit's k-means++ draws its seeds at random, and the spec starts from the seeds it drew.
The data are three well separated modes, so that no component comes near the guards' clamps.
"""
from __future__ import annotations

import pytest
import torch

from models.mixture_norm import MixtureNorm2d
from tests import mn_spec

K, C, SHAPE = 3, 4, (6, 4, 5, 5)
EPS, VAR_FLOOR, LAMBDA_MIN, MOMENTUM = 1e-5, 1e-4, 1e-2, 0.1


def _data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0, 0.0, 2.0, 1.0], [0.0, 3.0, -2.0, 0.5], [3.0, -2.0, 0.0, -1.0]], dtype=torch.float64)
    mode = torch.randint(0, K, (SHAPE[0], 1, SHAPE[2], SHAPE[3]), generator=g)
    x = centres[mode.squeeze(1)].permute(0, 3, 1, 2)
    return x + 0.7 * torch.randn(SHAPE, generator=g, dtype=torch.float64)


def _stored(per_channel: bool):
    """A mixture near the data's, as a previous step would have left it; lam (K, G)."""
    g = torch.Generator().manual_seed(1)
    lam = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)[:, None].expand(K, C if per_channel else 1).clone()
    mu = torch.tensor([[-2.5, 0.5, 1.5, 1.0], [0.5, 2.5, -1.5, 0.0], [2.5, -1.5, 0.5, -0.5]], dtype=torch.float64)
    sigma2 = 0.8 + 0.4 * torch.rand(K, C, generator=g, dtype=torch.float64)
    return lam, mu, sigma2


def _running(per_channel: bool) -> dict:
    lam, mu, sigma2 = _stored(per_channel)
    g = torch.Generator().manual_seed(2)
    return {"lambda": lam.flip(0), "mu": mu + 0.1, "sigma2": sigma2 * 1.1,
            "E": mu + 0.2 * torch.randn(K, C, generator=g, dtype=torch.float64),
            "V": 0.5 + torch.rand(K, C, generator=g, dtype=torch.float64)}


def _layer(per_channel: bool, **options) -> MixtureNorm2d:
    m = MixtureNorm2d(C, num_components=K, eps=EPS, momentum=MOMENTUM, em_steps=options.pop("em_steps", 1),
                      em_samples=10**6, lambda_min=LAMBDA_MIN, var_floor=VAR_FLOOR, dead_steps=10**6,
                      posteriors="per_channel" if per_channel else "joint", fuse="never", dtype=torch.float64,
                      **options)
    lam, mu, sigma2 = _stored(per_channel)
    running = _running(per_channel)
    with torch.no_grad():
        m.gmm_lambda.copy_(lam if per_channel else lam[:, 0])
        m.gmm_mu.copy_(mu)
        m.gmm_sigma2.copy_(sigma2)
        m.initialized.fill_(True)
        m.running_lambda.copy_(running["lambda"] if per_channel else running["lambda"][:, 0])
        for name in ("mu", "sigma2", "E", "V"):
            getattr(m, f"running_{name}").copy_(running[name])
        m.num_batches_tracked.fill_(5)
        if m.affine:
            m.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=torch.float64))
            m.bias.copy_(torch.linspace(-0.2, 0.3, C, dtype=torch.float64))
    m._ready = None
    return m


def _spec_train(x, per_channel, em_steps=1, prior_scaling=True, detach_posteriors=True, affine=True):
    gamma = torch.linspace(0.5, 1.5, C, dtype=torch.float64) if affine else None
    beta = torch.linspace(-0.2, 0.3, C, dtype=torch.float64) if affine else None
    y, fit, n, E, V = mn_spec.train_forward(
        mn_spec.as_rows(x), _stored(per_channel), em_steps=em_steps, var_floor=VAR_FLOOR, eps=EPS,
        lambda_min=LAMBDA_MIN, prior_scaling=prior_scaling, detach_posteriors=detach_posteriors, gamma=gamma,
        beta=beta)
    return mn_spec.from_rows(y, x.shape), fit, n, E, V


OPTIONS = [dict(per_channel=p, prior_scaling=s, detach_posteriors=d, em_steps=e, affine=a)
           for p in (False, True) for s, d, e, a in [(True, True, 1, True), (False, True, 1, True),
                                                      (True, False, 1, True), (True, True, 3, False),
                                                      (True, True, 0, True)]]


def _id(o: dict) -> str:
    return "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in o.items())


@pytest.mark.parametrize("o", OPTIONS, ids=_id)
def test_training_step_equals_the_spec_forward_backward_and_running_update(o):
    per_channel = o["per_channel"]
    layer = _layer(per_channel, em_steps=o["em_steps"], prior_scaling=o["prior_scaling"],
                   detach_posteriors=o["detach_posteriors"], affine=o["affine"])
    x = _data().requires_grad_()
    x_spec = x.detach().clone().requires_grad_()
    y = layer(x)
    y_spec, fit, n, E, V = _spec_train(x_spec, per_channel, o["em_steps"], o["prior_scaling"],
                                       o["detach_posteriors"], o["affine"])
    torch.testing.assert_close(y, y_spec, rtol=0, atol=1e-10)

    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (y * g).sum().backward()
    (y_spec * g).sum().backward()
    torch.testing.assert_close(x.grad, x_spec.grad, rtol=0, atol=1e-10)

    # The stored mixture for the next step is the fit; the running estimates moved by momentum.
    lam = layer.gmm_lambda if per_channel else layer.gmm_lambda[:, None]
    for got, want in zip((lam, layer.gmm_mu, layer.gmm_sigma2), fit):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    running = mn_spec.running_update(_running(per_channel), fit, n, E, V, MOMENTUM)
    r_lam = layer.running_lambda if per_channel else layer.running_lambda[:, None]
    torch.testing.assert_close(r_lam, running["lambda"], rtol=0, atol=1e-10)
    for name in ("mu", "sigma2", "E", "V"):
        torch.testing.assert_close(getattr(layer, f"running_{name}"), running[name], rtol=0, atol=1e-10)


@pytest.mark.parametrize("per_channel", [False, True], ids=["joint", "per_channel"])
@pytest.mark.parametrize("prior_scaling", [True, False], ids=["gain", "no-gain"])
@pytest.mark.parametrize("detach_posteriors", [True, False], ids=["detached", "through-tau"])
def test_eval_mode_equals_the_spec(per_channel, prior_scaling, detach_posteriors):
    layer = _layer(per_channel, prior_scaling=prior_scaling, detach_posteriors=detach_posteriors).eval()
    x = _data(seed=4).requires_grad_()
    y = layer(x)
    x_spec = x.detach().clone().requires_grad_()
    rows = mn_spec.eval_forward(mn_spec.as_rows(x_spec), _running(per_channel), EPS, LAMBDA_MIN, prior_scaling,
                                detach_posteriors, torch.linspace(0.5, 1.5, C, dtype=torch.float64),
                                torch.linspace(-0.2, 0.3, C, dtype=torch.float64))
    y_spec = mn_spec.from_rows(rows, x.shape)
    torch.testing.assert_close(y, y_spec, rtol=0, atol=1e-10)
    y.sum().backward()
    y_spec.sum().backward()
    torch.testing.assert_close(x.grad, x_spec.grad, rtol=0, atol=1e-10)


def test_one_component_is_batchnorm_by_the_spec_too():
    """The spec's own check: with K = 1 its training forward is F.batch_norm's (an oracle outside both)."""
    x = _data().requires_grad_()
    rows = mn_spec.as_rows(x)
    mixture = (torch.ones(1, 1, dtype=torch.float64), rows.mean(0, keepdim=True).detach(),
               rows.var(0, keepdim=True).detach())
    y, *_ = mn_spec.train_forward(rows, mixture, em_steps=1, var_floor=VAR_FLOOR, eps=EPS, lambda_min=LAMBDA_MIN,
                                  prior_scaling=True, detach_posteriors=True)
    want = torch.nn.functional.batch_norm(x, None, None, training=True, eps=EPS)
    torch.testing.assert_close(mn_spec.from_rows(y, x.shape), want, rtol=0, atol=1e-12)
    g = torch.autograd.grad(y.square().sum(), x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(want.square().sum(), x)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("per_channel", [False, True], ids=["joint", "per_channel"])
@pytest.mark.parametrize("em_steps", [1, 3])
def test_fresh_fit_equals_the_spec_from_its_seeds(per_channel, em_steps, monkeypatch):
    """fit: fresh. k-means++ draws the seeds at random, so the spec starts from the seeds the layer drew: from
    them, em_steps of the spec's EM, the components relabelled to the stored mixture's order by the spec's
    greedy matching (per group, the pair of least standardized distance first), then the spec's transform."""
    from models import mixture_core as core
    seeds = []
    seed = core.seed

    def recording(xs, o, sums, first_rank_only):
        seeds.append(seed(xs, o, sums, first_rank_only))
        return seeds[-1]

    monkeypatch.setattr(core, "seed", recording)
    layer = _layer(per_channel, em_steps=em_steps, fit="fresh")
    x = _data(seed=5)
    shift = layer.gmm_lambda.reshape(K, -1).expand(K, C).mul(layer.gmm_mu).sum(0)  # the stored mixture's mean
    y = layer(x)
    (lam, mu, sigma2), = [(s.lam, s.mu + shift, s.sigma2) for s in seeds]
    rows = mn_spec.as_rows(x)
    for _ in range(em_steps):
        lam, mu, sigma2 = mn_spec.em_step(rows, lam, mu, sigma2, VAR_FLOOR, EPS)
    _, prev_mu, prev_sigma2 = _stored(per_channel)
    groups = C if per_channel else 1
    order = torch.empty(K, groups, dtype=torch.long)
    for g in range(groups):
        cols = slice(g, g + 1) if per_channel else slice(None)
        cost = {(j, k): (((mu[j, cols] - prev_mu[k, cols]) ** 2) / (sigma2[j, cols] + prev_sigma2[k, cols])).sum()
                for j in range(K) for k in range(K)}
        new, old = set(), set()
        for j, k in sorted(cost, key=cost.get):
            if j not in new and k not in old:
                order[k, g] = j
                new.add(j), old.add(k)
    pick = lambda t: t.gather(0, order if t.shape[1] == groups else order.expand(K, C))
    fit = (pick(lam), pick(mu), pick(sigma2))
    stored_lam = layer.gmm_lambda if per_channel else layer.gmm_lambda[:, None]
    for got, want in zip((stored_lam, layer.gmm_mu, layer.gmm_sigma2), fit):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    tau = mn_spec.posteriors(rows, *fit)
    _, E, V = mn_spec.statistics(rows, tau)
    y_spec = mn_spec.transform(rows, tau, fit[0], E, V, EPS, LAMBDA_MIN, True,
                               torch.linspace(0.5, 1.5, C, dtype=torch.float64),
                               torch.linspace(-0.2, 0.3, C, dtype=torch.float64))
    torch.testing.assert_close(y, mn_spec.from_rows(y_spec, x.shape), rtol=0, atol=1e-10)
