"""scripts/variants_table.py: the variants study's summary table is exactly what compare, bench and diagnose said."""
from __future__ import annotations

import json
import math
import sys

import pytest

from gan.tools.compare import compare_runs
from tests.conftest import ROOT
from tests.test_compare import make_run

sys.path.insert(0, str(ROOT / "scripts"))
import variants_table  # noqa: E402


def test_table_rows_come_from_the_tools_outputs(tmp_path):
    root = tmp_path / "runs"
    runs = [make_run(root, "bn-s0", {1000: 100, 2000: 60, 3000: 40}, norm="bn", seed=0),
            make_run(root, "bn-s1", {1000: 110, 2000: 70, 3000: 44}, norm="bn", seed=1),
            make_run(root, "mn-s0", {1000: 90, 2000: 55, 3000: 50}, norm="mn", seed=0),
            make_run(root, "mn-layer01-s0", {1000: 80, 2000: 41, 3000: 39}, norm="mn", seed=0,
                     **{"model.mn_layers": [0, 1]})]
    out = tmp_path / "cmp"
    compare_runs(runs, out, "fid", also_at=(100, 50))
    compare_runs(runs, out, "kid")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"ratio_name": "MN/BN step time, layers 0,1", "ratio": 1.07},
                                 {"ratio_name": "MN/BN step time", "ratio": 1.2}]))
    diag = tmp_path / "diag"
    diag.mkdir()
    (diag / "mn-layer01-s0.txt").write_text(
        "ckpt (step 3000, norm mn)\n #  layer kind C skew ex.kurt overlap  mixture weights\n"
        " 0  net.1  mn  256  0.01  0.35  0.979  0.49 0.00 0.51\n 1  net.4  mn  128  -0.11  18.16  0.933  0.3 0.4 0.3\n"
        " 2  net.7  bn  64  -2.01  48.01  0.839  0.49 0.43 0.07\n")
    text = variants_table.table(out, [json.loads(bench.read_text())], diag)
    lines = text.splitlines()
    assert lines[0].startswith("| variant | seeds | best KID | best KID − BN's | best FID | step of best KID | steps to FID 100 (speed-up) "
                               "| steps to FID 50 (speed-up) | steps to BN's best FID, 42.0 (speed-up) |")
    # sorted by best KID: MN in layers 0, 1 (0.039), BN (0.042 +- 0.0028), full MN (0.050)
    assert lines[2] == ("| MN in layers 0, 1 only | 0 | 0.0390 | -0.0030 | 39.0 | 3000 | 1000 (1.50×) | 2000 (1.50×) "
                        "| 2000 (1.50×) | 1.07× | 0.979/0.933/0.839 |")
    assert lines[3] == "| BN | 0, 1 | 0.0420 ± 0.0028 | – | 42.0 ± 2.8 | 3000, 3000 | 1500 ± 707 | 3000 ± 0 | 3000 (1/2 reached) | – | – |"
    assert lines[4] == ("| full MN (the spec's defaults) | 0 | 0.0500 | +0.0080 | 50.0 | 3000 | 1000 (1.50×) | 3000 (1.00×) "
                        "| not reached | 1.20× | – |")


def test_gap_to_bn_is_in_welch_standard_errors_when_both_have_seeds():
    def group(best, n):
        mean = sum(best) / n
        std = math.sqrt(sum((b - mean) ** 2 for b in best) / (n - 1)) if n > 1 else None
        return {"best": {"mean": mean, "std": std}, "runs": [{}] * n}
    bn, mn = group([0.040, 0.036, 0.038], 3), group([0.041, 0.043, 0.042], 3)  # means 0.038, 0.042; stds 0.002, 0.001
    se = math.sqrt(0.002 ** 2 / 3 + 0.001 ** 2 / 3)
    assert variants_table.gap_cell(mn, bn) == f"+0.0040 ({0.004 / se:.1f} SE)" == "+0.0040 (3.1 SE)"
    assert variants_table.gap_cell(group([0.030], 1), bn) == "-0.0080"  # one seed: no spread, no SE
    assert variants_table.gap_cell(bn, bn) == "–"


def test_missing_compare_output_is_a_one_line_error(tmp_path, monkeypatch):
    """sys.exit with a message: Python prints it to stderr and exits with status 1, no traceback."""
    monkeypatch.setattr(sys, "argv", ["variants_table.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        variants_table.main()
    message = exited.value.code
    assert isinstance(message, str) and message.startswith("error: variants_table: FileNotFoundError")
    assert len(message.splitlines()) == 1
