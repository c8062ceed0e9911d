"""`groupflow bench learn`'s parts: variants from the command line, and accuracy against training time."""
import pytest

from cluster.bench_learn import PRECISION_VARIANTS, curve, parse_variants


def test_variants_parse_to_names_and_overrides():
    assert parse_variants("a:x.y=1 z=2; b c:") == [("a", ["x.y=1", "z=2"]), ("b c", [])]
    names = [n for n, _ in parse_variants(PRECISION_VARIANTS)]
    assert names == ["bf16 both", "bf16 engine + fp32 learner", "fp32 both"]
    with pytest.raises(ValueError, match="no variant"):
        parse_variants(" ; ")


def test_the_curve_is_held_out_accuracy_against_minutes_of_training():
    rows = [{"time_step_s": 30.0}, {"time_step_s": 30.0, "eval_pass@1": 0.25}, {"time_step_s": 60.0},
            {"time_step_s": 60.0, "eval_pass@1": 0.5}]
    assert curve(rows, 0.1) == [[0.0, 0.1], [1.0, 0.25], [3.0, 0.5]]
    assert curve(rows, None) == [[1.0, 0.25], [3.0, 0.5]]
