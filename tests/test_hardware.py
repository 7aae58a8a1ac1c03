"""bf16_autocast: auto resolves from the CPU's flags, and the pipeline says what it chose."""

import pytest

from evil_moe import config, hardware
from evil_moe.config import ConfigError, load_preset

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2\n\nprocessor\t: 1\nflags\t: fpu avx2\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def _write(tmp_path, text):
    p = tmp_path / "cpuinfo"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, fast, word", [(AVX2_ONLY, False, "AVX2"),
                                              (SAPPHIRE, True, "amx_bf16"),
                                              (ARM_BF16, True, "bf16")])
def test_native_bf16_reads_the_cpu_flags(tmp_path, text, fast, word):
    ok, why = hardware.native_bf16("cpu", cpuinfo=_write(tmp_path, text))
    assert ok is fast and word in why


def test_unreadable_flags_do_not_assume_bf16(tmp_path):
    ok, why = hardware.native_bf16("cpu", cpuinfo=tmp_path / "missing")
    assert not ok and "cannot read" in why


@pytest.mark.parametrize("fast", [True, False])
def test_auto_is_resolved_when_the_config_loads(monkeypatch, fast):
    seen = []

    def fake(device="auto", cpuinfo=None):
        seen.append(device)
        return fast, "fake"
    monkeypatch.setattr(hardware, "native_bf16", fake)
    cfg = load_preset("cpu-demo")             # the preset says bf16_autocast: auto
    assert cfg.bf16_autocast is fast and seen == ["auto"]
    assert cfg.to_dict()["bf16_autocast"] is fast        # what run folders record
    assert load_preset("cpu-demo", device="cpu").bf16_autocast is fast and seen[-1] == "cpu"
    # an explicit value is taken as given
    assert load_preset("cpu-demo", bf16_autocast=not fast).bf16_autocast is (not fast)


def test_auto_is_refused_where_a_field_has_no_resolver():
    with pytest.raises(ConfigError, match="'steps' must be int"):
        config.from_dict({"steps": "auto"})


def test_precision_line_warns_when_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device="auto": (False, "no bf16 here"))
    monkeypatch.setattr(hardware, "uses_cuda", lambda device: False)
    on = config.from_dict({"bf16_autocast": True})
    off = config.from_dict({"bf16_autocast": False})
    assert "warning" in hardware.precision_line(on) and "no bf16 here" in hardware.precision_line(on)
    line = hardware.precision_line(off)
    assert "autocast off" in line and "warning" not in line and "several times longer" in line


@pytest.mark.parametrize("cuda", [True, False])
def test_training_attention_auto_is_eager_on_cpu_and_sdpa_on_gpu(monkeypatch, cuda):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = config.from_dict({"training_attention": "auto"})       # device auto
    assert cfg.training_attention == ("sdpa" if cuda else "eager")
    assert config.from_dict({"training_attention": "auto", "device": "cpu"}
                            ).training_attention == "eager"
    assert config.from_dict({"training_attention": "auto", "device": "cuda"}
                            ).training_attention == "sdpa"     # a GPU preset loads on a CPU host
    with pytest.raises(ConfigError, match="training_attention"):
        config.from_dict({"training_attention": "flash"})
