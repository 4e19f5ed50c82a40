"""`cli.py bench`'s last line: each time ratio once, the MN variants' step times as one range, no memory."""
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
