"""dtype `auto` follows the hardware: decided from a device's capabilities, given here, not read
from whatever machine runs the test."""
import pytest

from cluster.config import Config, dump_config, load_config
from cluster.precision import Caps, choose_dtype, probe_caps, resolve_precision

AVX2 = Caps.cpu("AVX2", avx512_bf16=False, amx=False)            # an AMD EPYC of our kind
AVX512_BF16 = Caps.cpu("AVX512", avx512_bf16=True, amx=False)
SAPPHIRE = Caps.cpu("AVX512", avx512_bf16=False, amx=True)
A100 = Caps("cuda", "NVIDIA A100", native_bf16=True)
V100 = Caps("cuda", "Tesla V100", native_bf16=False)


@pytest.mark.parametrize("caps,want", [(AVX2, "float32"), (AVX512_BF16, "bfloat16"), (SAPPHIRE, "bfloat16"),
                                       (A100, "bfloat16"), (V100, "float32")])
def test_auto_is_bf16_only_where_native(caps, want):
    assert choose_dtype("auto", caps) == (want, None)


def test_explicit_choice_wins_with_a_warning_on_a_cpu_without_bf16():
    dtype, warning = choose_dtype("bfloat16", AVX2)
    assert dtype == "bfloat16" and "AVX2" in warning and "float32" in warning
    assert choose_dtype("bfloat16", AVX512_BF16) == ("bfloat16", None)
    assert choose_dtype("float32", AVX512_BF16) == ("float32", None)


def test_resolved_config_records_the_choice(caplog):
    cfg = Config()
    assert cfg.engines.dtype == cfg.learner.dtype == "auto"  # the default
    with caplog.at_level("INFO", logger="groupflow"):
        slow = resolve_precision(cfg, {"cpu": AVX2})
    assert (slow.engines.dtype, slow.learner.dtype) == ("float32", "float32")
    assert "engines.dtype = float32 (auto: cpu AVX2)" in caplog.text
    fast = resolve_precision(load_config(overrides=["learner.dtype=float32"]), {"cpu": AVX512_BF16})
    assert (fast.engines.dtype, fast.learner.dtype) == ("bfloat16", "float32")
    assert "dtype: auto" not in dump_config(fast) and cfg.engines.dtype == "auto"  # a copy


def test_probe_reads_this_cpu():
    caps = Caps(**probe_caps("cpu"))
    assert caps.device == "cpu" and caps.name.split()[0] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "SVE256")
