"""`cli.py bench`: its last line (each time ratio once, the MN variants' step times as one range, no memory),
the rows `bench norm` names for the tables, and the warning when the CPU is busy."""
import time

import pytest

from gan.tools.bench import Row, headline


def row(name, ratio, unit="ms/step"):
    return Row("norm", name, ratio, 1.0, unit, name, ratio)


def test_headline_keeps_time_ratios_and_folds_the_variants_into_a_range():
    rows = [row("ours/classic step time", 0.61), row("MN/BN step time", 1.12), row("MN/BN memory", 1.0, "MiB"),
            row("MN/BN step time, per_channel", 1.76), row("MN/BN memory, per_channel", 1.38, "MiB"),
            row("MN/BN step time, layer 0", 1.02)]
    assert headline(rows) == ("headline: ours/classic step time 0.61x; MN/BN step time 1.12x; "
                              "MN/BN step time of the 2 other MN variants 1.02-1.76x")
    assert headline(rows[:2]) == "headline: ours/classic step time 0.61x; MN/BN step time 1.12x"


def test_a_ratio_between_two_codes_is_the_median_of_each_rounds_ratio():
    """Round 3 ran on a busier machine for both sides: the medians' ratio (1.1) would blame code A for it; each
    round's ratio (1, 1.1, 1) does not. Quartiles by the textbook's (n + 1) p rule on the sorted ratios."""
    from gan.tools.bench_common import paired_ratio
    assert paired_ratio([1.0, 1.1, 3.0], [1.0, 1.0, 3.0]) == pytest.approx((1.0, 1.0, 1.1))
    assert paired_ratio([2.0, 6.0, 3.0, 4.0, 1.0], [1.0, 2.0, 1.0, 1.0, 1.0]) == pytest.approx((3.0, 1.5, 3.5))
    assert paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)  # one round: no spread to report


@pytest.mark.slow  # it compiles the fused layer
def test_bench_norm_times_every_mn_variant_under_the_name_the_tables_look_up():
    """One step per trainer at width 8: every variant gets a step-time and a memory row, named by
    mn_ratio_name (which scripts/variants_table.py reads back), the defaults under the old bare name."""
    import torch
    from gan.tools.bench import CORE_AUTOGRAD, FAST_RATIO, MN_VARIANTS, bench_norm, mn_ratio_name
    rows = bench_norm(torch.device("cpu"), steps=1, repeats=1, ngf=8, batch_size=8)
    # then the defaults fused (on a CPU MN does not fuse by default) and with autograd through the core, the
    # eager fast path against the latter, then one layer's host time, eager and fused
    assert [r.ratio_name for r in rows] == [mn_ratio_name(what, v) for v in [*MN_VARIANTS, "fused", CORE_AUTOGRAD]
                                            for what in ("step time", "memory")] + [
        FAST_RATIO + " step time", FAST_RATIO + " memory"] + [
        mn_ratio_name("layer host time", kind) for kind in ("eager", "fused")]
    assert rows[0].ratio_name == "MN/BN step time" and rows[1].ratio_name == "MN/BN memory"
    assert all(r.ratio > 0 and r.ours > 0 and r.baseline > 0 for r in rows)
    # the variants differ in the work they do: per-channel posteriors keep more for backward than the defaults
    saved = {r.ratio_name: r.ours for r in rows if r.unit == "MiB"}
    assert saved[mn_ratio_name("memory", "per_channel")] > saved[mn_ratio_name("memory")]
    assert saved[mn_ratio_name("memory", "layer 0")] < saved[mn_ratio_name("memory")]
    # the fast path keeps x and tau for backward where autograd through the core keeps the features too
    assert saved[FAST_RATIO + " memory"] == saved[mn_ratio_name("memory")] < saved[mn_ratio_name("memory", CORE_AUTOGRAD)]
    fast_vs_core = rows[-4].extra
    assert fast_vs_core["fast path aten ops per step"] != fast_vs_core[f"{CORE_AUTOGRAD} aten ops per step"]
    # fused (compiled), a layer launches fewer kernels than the eager one dispatches ops
    eager, fused = rows[-2].extra, rows[-1].extra
    assert 0 < fused["MN launches"] < eager["MN aten ops"]
    assert fused["MN launches"] == fused["of which generated kernels"] + fused["of which library calls"]


def test_bench_norm_fuses_on_a_gpu_only_the_defaults_and_times_them_unfused_too():
    """Compiling every variant would cost a GPU check minutes: there only the defaults fuse (as a GPU run does)."""
    import torch
    from gan.tools.bench import DEFAULT_VARIANT, MN_VARIANTS, norm_variants
    gpu, cpu = norm_variants(torch.device("cuda")), norm_variants(torch.device("cpu"))
    assert list(gpu) == [*MN_VARIANTS, "unfused"] and list(cpu) == [*MN_VARIANTS, "fused"]
    assert gpu[DEFAULT_VARIANT] == {} and gpu["unfused"] == {"model.mn.fuse": "never"}
    assert all(o["model.mn.fuse"] == "never" for name, o in gpu.items() if name != DEFAULT_VARIANT)
    assert cpu["fused"] == {"model.mn.fuse": "always"} and all("model.mn.fuse" not in cpu[v] for v in MN_VARIANTS)


def test_a_cpu_bench_warns_when_other_processes_keep_the_cores_busy(monkeypatch):
    import os
    import torch
    from gan.tools import bench
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench, "_busy_cores", lambda: 1.9)
    warning = bench.busy_warning(torch.device("cpu"))
    assert warning.startswith("warning: other processes keep 1.9 of 2 cores busy")
    assert bench.busy_warning(torch.device("cuda")) is None  # GPU step times do not share the CPU's cores
    monkeypatch.setattr(bench, "_busy_cores", lambda: 0.1)
    assert bench.busy_warning(torch.device("cpu")) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(bench, "_busy_cores", lambda: 3.0)  # 3 busy cores of 16 leave the bench room
    assert bench.busy_warning(torch.device("cpu")) is None
    monkeypatch.setattr(bench, "_busy_cores", lambda: None)  # no /proc/stat (macOS): no claim either way
    assert bench.busy_warning(torch.device("cpu")) is None


def test_busy_cores_sees_a_process_that_spins():
    """Measured, not mocked: a child spinning on one core shows up as at least half a core busy."""
    import subprocess
    import sys
    from gan.tools import bench
    if bench._busy_cores(0.01) is None:
        pytest.skip("no /proc/stat on this system")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert bench._busy_cores(1.0) >= 0.5
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.slow
def test_bench_train_compile_times_the_compiled_step_against_eager_after_compiling(tmp_path, monkeypatch):
    """`bench train --compile` (bare: torch's default mode) at width 8: one row, compiled vs eager, in the
    table, the headline and the JSON; every compilation happens in the warm-up, none in the timed steps
    (dynamo compiles no frame there)."""
    import json
    import torch._dynamo
    from click.testing import CliRunner
    from torch._dynamo.utils import counters
    from cli import cli
    from gan.tools import bench_common
    timed = bench_common.timed_rounds
    compiled_while_timed = []

    def timed_rounds(fns, repeats, device):
        before = counters["frames"]["total"]
        out = timed(fns, repeats, device)
        compiled_while_timed.append(counters["frames"]["total"] - before)
        return out
    monkeypatch.setattr(bench_common, "timed_rounds", timed_rounds)
    torch._dynamo.reset()
    try:
        out = tmp_path / "bench.json"
        result = CliRunner().invoke(cli, ["bench", "train", "--compile", "--device", "cpu", "--steps", "2",
                                          "--repeats", "1", "--ngf", "8", "--json", str(out)])
        compiled_in_all = counters["frames"]["total"]
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 0, result.output
    [row] = json.loads(out.read_text())
    assert row["ratio_name"] == "compiled (default) speed-up vs eager"
    assert row["ratio"] == pytest.approx(row["baseline"] / row["ours"]) and row["ours"] > 0
    assert row["extra"]["warm_up_seconds (compilation included)"] > 0
    assert "compiled (default) vs eager" in result.output
    assert result.output.splitlines()[-1] == f"headline: compiled (default) speed-up vs eager {row['ratio']:.2f}x"
    assert compiled_in_all > 0 and compiled_while_timed == [0]


def test_bench_compile_refuses_eval_whose_networks_are_not_compiled():
    from click.testing import CliRunner
    from cli import cli
    result = CliRunner().invoke(cli, ["bench", "eval", "--compile", "reduce-overhead"])
    assert result.exit_code == 2 and "--compile times the training step" in result.output


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, says", [
    (["bench", "norm", "--against", "no-such-revision", "--device", "cpu"], "not a revision of this git checkout"),
    (["bench", "train", "--against", "HEAD"], "--against compares MN's code: bench norm"),
])
def test_bench_against_refuses_what_it_cannot_compare_in_one_line(argv, says):
    from click.testing import CliRunner
    from cli import cli
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
