"""Every expected error of the command lines is one line on stderr that names the
file or setting and the fix, with exit code 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evil_moe import checkpoint, evaluate, grpo
from evil_moe.__main__ import main
from evil_moe.cli import USAGE_EXIT
from evil_moe.config import load_preset

sys.path.insert(0, str(Path(__file__).parent))
from scripted_grader import scripted_verdicts  # noqa: E402

STEPS = 1


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """A finished vanilla smoke run of STEPS steps (scripted grader), as the CLI would
    have written it with ``train --preset smoke --arm vanilla --set steps=1``."""
    d = tmp_path_factory.mktemp("trained")
    cfg = load_preset("smoke", arm="vanilla", steps=STEPS)
    grpo.train(cfg, d, grade_fn=scripted_verdicts, progress=False,
               model_and_tokenizer=tiny).adapter.remove()
    return d


def _corrupt_copy(src: Path, dest: Path) -> Path:
    import shutil
    shutil.copytree(src, dest)
    target = dest / checkpoint.CHECKPOINT / checkpoint.OPTIMIZER_FILE
    target.write_bytes(target.read_bytes()[:100])
    return target


def test_bad_config_value_names_the_setting(tmp_path, capsys):
    assert main(["train", "--preset", "smoke", "--run-dir", str(tmp_path),
                 "--set", "lr=-1"]) == USAGE_EXIT
    assert "'lr'" in _one_error_line(capsys)
    assert main(["train", "--preset", "smoke", "--run-dir", str(tmp_path),
                 "--set", "nosuchfield=1"]) == USAGE_EXIT
    assert "nosuchfield" in _one_error_line(capsys)
    assert main(["train", "--preset", "smoke", "--run-dir", str(tmp_path),
                 "--set", "steps"]) == USAGE_EXIT
    assert "KEY=VALUE" in _one_error_line(capsys)
    assert main(["run", "--preset", "no-such-preset", "--no-book"]) == USAGE_EXIT
    line = _one_error_line(capsys)
    assert "no-such-preset" in line and "known presets" in line


def test_a_bad_yaml_preset_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("steps: [1,\n  lr: {\n")
    assert main(["run", "--preset", str(bad), "--no-book"]) == USAGE_EXIT
    assert str(bad) in _one_error_line(capsys)


def test_missing_v_act_names_the_file_and_the_fix(tmp_path, capsys):
    assert main(["train", "--preset", "smoke", "--arm", "evil_moe", "--run-dir",
                 str(tmp_path), "--set", "steps=1"]) == USAGE_EXIT
    line = _one_error_line(capsys)
    assert str(tmp_path / grpo.V_ACT_FILE) in line and "--extract-v-act" in line


def test_offline_hub_model_names_the_model_and_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))          # an empty cache
    assert main(["train", "--preset", "smoke", "--arm", "vanilla", "--run-dir",
                 str(tmp_path / "run"), "--set", "model=Qwen/Qwen3-4B", "steps=1",
                 "dtype=bfloat16", "gradient_checkpointing=true", "max_prompt_tokens=256",
                 "micro_batch_size=1"]) == USAGE_EXIT   # a plan that fits: the load is reached
    line = _one_error_line(capsys)
    assert "Qwen/Qwen3-4B" in line and "huggingface-cli download" in line


def test_corrupt_checkpoint_without_fallback_names_the_file(trained, tmp_path, capsys):
    bad = _corrupt_copy(trained, tmp_path / "run")
    assert main(["train", "--preset", "smoke", "--arm", "vanilla", "--run-dir",
                 str(tmp_path / "run"), "--set", f"steps={STEPS}"]) == USAGE_EXIT
    line = _one_error_line(capsys)
    assert str(bad) in line and "--no-resume" in line


def test_config_mismatch_on_resume_names_the_setting(trained, capsys):
    assert main(["train", "--preset", "smoke", "--arm", "vanilla", "--run-dir", str(trained),
                 "--set", f"steps={STEPS}", "lr=0.001"]) == USAGE_EXIT
    line = _one_error_line(capsys)
    assert "lr: 0.0001 -> 0.001" in line and "--no-resume" in line


def test_evaluate_cli_errors(trained, tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "nowhere")]) == USAGE_EXIT
    line = _one_error_line(capsys)
    assert "config.json" in line and "not a trained run" in line
    bad = _corrupt_copy(trained, tmp_path / "run")
    assert evaluate.main([str(tmp_path / "run"), "--device", "cpu"]) == USAGE_EXIT
    assert str(bad) in _one_error_line(capsys)


def _python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_python_m_entry_points_exit_2_without_traceback(trained, tmp_path):
    """The real entry points, as a user runs them."""
    res = _python_m("evil_moe", "train", "--preset", "smoke", "--run-dir", str(tmp_path),
                    "--set", "group_size=0")
    assert res.returncode == USAGE_EXIT and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "group_size" in res.stderr
    bad = _corrupt_copy(trained, tmp_path / "run")
    res = _python_m("evil_moe.evaluate", str(tmp_path / "run"), "--device", "cpu")
    assert res.returncode == USAGE_EXIT and "Traceback" not in res.stderr
    assert str(bad) in res.stderr and len(res.stderr.strip().splitlines()) == 1
