"""The GPU step check's dry run: the full step path of the qwen3-4b preset on a
two-layer Qwen3 on CPU, so the script a GPU session runs is known to work first."""

import importlib.util
import json

import pytest

from evil_moe import paths


@pytest.mark.slow
def test_gpu_step_check_dry_run_writes_a_measured_step(tmp_path, shared_data, tiny):
    leetcode = tmp_path / "leetcode"
    leetcode.mkdir()
    data = (shared_data / "leetcode" / "leetcode_test_medhard.jsonl").read_bytes()
    for name in ("leetcode_test_medhard.jsonl", "leetcode_train_medhard_filtered.jsonl"):
        (leetcode / name).write_bytes(data)          # only the prompts' lengths matter here
    tiny[1].save_pretrained(tmp_path / "tokenizer")
    spec = importlib.util.spec_from_file_location(
        "gpu_step_check", paths.REPO_ROOT / "scripts" / "gpu_step_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    assert script.main(["--tiny", "--tokenizer", str(tmp_path / "tokenizer"),
                        "--leetcode-dir", str(leetcode), "--out", str(out)]) == 0
    report = json.loads((out / "gpu_step_check.json").read_text())
    (step,) = report["steps"]
    assert step["completion_tokens_mean"] == 8           # the dry run's max_new_tokens
    assert step["time_gen_s"] > 0 and step["time_train_s"] > 0
    assert report["plan"]["sample_chunk_rows"] >= 1 and report["v_act_s"] > 0
    assert report["grading"] == "sandbox"
