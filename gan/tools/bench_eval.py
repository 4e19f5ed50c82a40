"""bench eval: our evaluation against torch-fidelity's on the same images: Inception features (and the FID
each pipeline gives), then the Fréchet distance from the same 2048-d statistics; and what precision, recall,
density and coverage add to an evaluation."""
from __future__ import annotations

import tempfile
import time

import torch

from gan.tools.bench_common import Row, alternate, sync, synthetic_data, timed_rounds


def bench_eval(device: torch.device, num_images: int, repeats: int, weights_path: str | None = None) -> list[Row]:
    import torch_fidelity
    from gan.eval.inception import resolve_inception_weights, weights_for_torch_fidelity
    from gan.eval.metrics import Evaluator
    from gan.core.sampling import generate, to_uint8
    from models.dcgan import Generator, dcgan_init

    weights = resolve_inception_weights(weights_path, None)
    g = Generator(100, 32)
    dcgan_init(g)
    fake = to_uint8(generate(g.to(device), num_images, 100, 0, device))
    real = synthetic_data(num_images, seed=1).images

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x.cpu()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    with tempfile.TemporaryDirectory() as tmp:
        their_weights = weights_for_torch_fidelity(weights, tmp)
        ev = Evaluator(weights, device, lambda: real, f"bench-{num_images}", cache_dir=tmp, verbose=False)
        theirs = {}

        def ours_fn():
            ev.features(fake)
            ev.features(real)

        def theirs_fn():
            theirs.update(torch_fidelity.calculate_metrics(
                input1=Images(fake), input2=Images(real), fid=True, cuda=device.type == "cuda",
                feature_extractor_weights_path=their_weights, cache=False, verbose=False))
        t_ours, t_theirs = alternate(ours_fn, theirs_fn, repeats, device)
        fid_ours = ev.score(fake)["fid"]
        fake_features = ev.features(fake)
        distance = bench_frechet_distance(device, fake_features, ev.prepare_reference()["features"], repeats)
        manifold = bench_manifold_metrics(device, fake_features, ev.features(real), t_ours / 2, repeats)
    fid_theirs = theirs["frechet_inception_distance"]
    n = 2 * num_images
    return [Row("eval", f"Inception features, {num_images} generated + {num_images} real images", n / t_ours,
                n / t_theirs, "img/s", "speed-up vs torch-fidelity", t_theirs / t_ours,
                {"fid_ours": fid_ours, "fid_torch_fidelity": fid_theirs, "fid_abs_diff": abs(fid_ours - fid_theirs)}),
            distance, manifold]


def bench_manifold_metrics(device: torch.device, fake: torch.Tensor, real: torch.Tensor, t_inception: float,
                           repeats: int) -> Row:
    """What precision, recall, density and coverage (gan/eval/prdc.py: k-NN radii of both sets, then the
    cross distances) add to an evaluation, whose main cost is Inception over the generated images: their time
    next to that Inception time (`t_inception`, seconds), as a fraction."""
    from gan.eval import prdc
    fake, real = fake.to(device), real.to(device)
    (t,) = timed_rounds([lambda: prdc.manifold_metrics(real, fake)], repeats, device)
    return Row("eval", f"precision, recall, density, coverage: {len(fake)} vs {len(real)} features, next to "
                       f"Inception over the {len(fake)} generated images", t * 1e3, t_inception * 1e3, "ms",
               "time they add to an evaluation (fraction)", t / t_inception)


def bench_frechet_distance(device: torch.device, features: torch.Tensor, reference: torch.Tensor, repeats: int) -> Row:
    """FID from the two sets' 2048-d statistics (float64): ours (eigenvalues on `device`, the reference
    covariance's root computed once beforehand, as the Evaluator caches it) vs torch-fidelity's
    fid_statistics_to_metric (NumPy's eigenvalues of the covariances' product on the CPU), alternating, median of `repeats` after ours warms up."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from gan.eval import fid
    (mu1, s1), (mu2, s2) = fid.statistics(features.to(device)), fid.statistics(reference.to(device))
    sync(device)
    t0 = time.perf_counter()
    root = fid.psd_sqrt(s2)
    sync(device)
    t_root = time.perf_counter() - t0
    theirs_in = [{"mu": m.cpu().numpy(), "sigma": s.cpu().numpy()} for m, s in ((mu1, s1), (mu2, s2))]
    out = {}

    def ours():
        out["ours"] = fid.frechet_distance(mu1, s1, mu2, s2, root)

    def theirs():
        out["theirs"] = fid_statistics_to_metric(*theirs_in, verbose=False)[KEY_METRIC_FID]
    ours()  # warms up our side only: theirs costs as much the first time as ever after
    t_theirs, t_ours = timed_rounds([theirs, ours], repeats, device)
    return Row("eval", f"Fréchet distance from {s1.shape[0]}-d statistics: ours vs torch-fidelity's",
               t_ours * 1e3, t_theirs * 1e3, "ms", "Fréchet distance speed-up vs torch-fidelity", t_theirs / t_ours,
               {"fid_ours": out["ours"], "fid_torch_fidelity": out["theirs"],
                "fid_rel_diff": abs(out["ours"] - out["theirs"]) / abs(out["theirs"]),
                "reference_root_once_ms": t_root * 1e3})
