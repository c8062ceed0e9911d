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


@pytest.mark.parametrize("caps,want", [(AVX2, "float32"), (AVX512_BF16, "float32"), (SAPPHIRE, "float32"),
                                       (A100, "bfloat16"), (V100, "float32")])
def test_auto_keeps_a_cpu_learner_in_fp32(caps, want):
    """Chosen by time to accuracy (bench learn): bf16 engines, an fp32 learner on CPUs."""
    assert choose_dtype("auto", caps, "learner") == (want, None)


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
    fast = resolve_precision(cfg, {"cpu": AVX512_BF16})
    assert (fast.engines.dtype, fast.learner.dtype) == ("bfloat16", "float32")
    both = resolve_precision(load_config(overrides=["learner.dtype=bfloat16"]), {"cpu": AVX512_BF16})
    assert (both.engines.dtype, both.learner.dtype) == ("bfloat16", "bfloat16")  # an explicit choice wins
    assert "dtype: auto" not in dump_config(fast) and cfg.engines.dtype == "auto"  # a copy


def test_probe_reads_this_cpu():
    caps = Caps(**probe_caps("cpu"))
    assert caps.device == "cpu" and caps.name.split()[0] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "SVE256")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Simulates one CUDA device of a given compute capability under torch's own is_bf16_supported
    (there is no GPU here); records the arguments of every is_bf16_supported call."""
    import types

    import torch

    calls = []
    real = torch.cuda.is_bf16_supported

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    def install(name: str, capability: tuple[int, int]):
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(name=name, major=capability[0],
                                                                      minor=capability[1]))
        # a bf16 tensor can be made on a T4 or V100: bf16 there is emulated, not absent
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", spy)
        return calls

    return install


@pytest.mark.parametrize("name,capability,want", [("Tesla T4", (7, 5), "float32"), ("Tesla V100", (7, 0), "float32"),
                                                  ("NVIDIA A100", (8, 0), "bfloat16"),
                                                  ("NVIDIA H100", (9, 0), "bfloat16")])
def test_probe_counts_only_native_gpu_bf16(fake_gpu, name, capability, want):
    import torch

    calls = fake_gpu(name, capability)
    if capability < (8, 0):
        assert torch.cuda.is_bf16_supported()  # torch's default answer counts emulation: the trap
        calls.clear()
    caps = Caps(**probe_caps("cuda"))
    assert caps == Caps("cuda", name, native_bf16=capability >= (8, 0))
    assert calls and all(kwargs.get("including_emulation") is False for _, kwargs in calls), calls
    assert choose_dtype("auto", caps) == (want, None)
