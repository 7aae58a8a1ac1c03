"""Checkpoints survive a kill at any point of a save, are verified on load, and a
corrupt newest one falls back to the previous with a warning naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from evil_moe import checkpoint, grpo
from evil_moe.adapter import ExpertAdapter
from evil_moe.config import load_preset
from evil_moe.router import HackRouter
from evil_moe.vact import haar_direction

sys.path.insert(0, str(Path(__file__).parent))
from scripted_grader import scripted_verdicts  # noqa: E402

FILES = ["adapter/adapter.safetensors", "adapter/adapter_config.json", "router.safetensors",
         "optimizer.safetensors", "rng.safetensors", "state.json"]


@pytest.fixture
def parts(tiny):
    """A real adapter, router, AdamW (with state) and scheduler on the tiny model."""
    model, _ = tiny
    cfg = load_preset("smoke")
    adapter = ExpertAdapter.from_config(model, cfg)
    router = HackRouter(haar_direction(len(adapter.module_names), adapter.rank, seed=0))
    params = adapter.parameters() + list(router.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    yield {"adapter": adapter, "router": router, "optimizer": optimizer, "scheduler": scheduler,
           "config": cfg.to_dict()}
    adapter.remove()


def _advance(parts) -> None:
    """One optimizer step with a made-up gradient: every tensor of the state moves."""
    for p in parts["adapter"].parameters() + list(parts["router"].parameters()):
        p.grad = torch.randn_like(p)
    parts["optimizer"].step()
    parts["scheduler"].step()


def _save(run_dir: Path, parts, step: int) -> Path:
    _advance(parts)
    return checkpoint.save(run_dir, step=step, **parts)


def _snapshot(parts) -> dict[str, torch.Tensor]:
    """Every tensor that a checkpoint restores, by name."""
    out = {f"adapter.{k}": v.clone() for k, v in parts["adapter"].state_dict().items()}
    out.update({f"router.{k}": v.clone() for k, v in parts["router"].state_dict().items()})
    for i, s in parts["optimizer"].state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return out


def _assert_restored(parts, snap, step_state) -> None:
    now = _snapshot(parts)
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k
    assert parts["scheduler"].state_dict() == step_state


def _load(run_dir: Path, parts) -> dict:
    return checkpoint.load(checkpoint.latest(run_dir), **{k: parts[k] for k in
                           ("adapter", "router", "optimizer", "scheduler")})


def test_save_keeps_the_previous_checkpoint_and_both_verify(tmp_path, parts):
    _save(tmp_path, parts, 0)
    snap0, sched0 = _snapshot(parts), parts["scheduler"].state_dict()
    _save(tmp_path, parts, 1)
    snap1, sched1 = _snapshot(parts), parts["scheduler"].state_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CHECKPOINT,
                                                          checkpoint.PREVIOUS]
    assert checkpoint.defect(tmp_path / checkpoint.CHECKPOINT) is None
    assert checkpoint.defect(tmp_path / checkpoint.PREVIOUS) is None
    state = checkpoint.read_state(tmp_path / checkpoint.CHECKPOINT)
    assert sorted(state["files"]) == sorted(f for f in FILES if f != "state.json")
    _advance(parts)                                   # move away, then restore step 1
    assert _load(tmp_path, parts)["step"] == 1
    _assert_restored(parts, snap1, sched1)
    # the previous one restores step 0 exactly
    shutil.rmtree(tmp_path / checkpoint.CHECKPOINT)
    assert _load(tmp_path, parts)["step"] == 0
    _assert_restored(parts, snap0, sched0)


class Crash(Exception):
    pass


def _crash_at(monkeypatch, n: int) -> dict:
    """Make the n-th file operation of a save raise (writes, deletes, renames, fsyncs)."""
    calls = {"n": 0}

    def wrap(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise Crash(f"killed at operation {n}")
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(checkpoint, "save_file", wrap(checkpoint.save_file))
    monkeypatch.setattr(checkpoint.os, "replace", wrap(os.replace))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", wrap(shutil.rmtree))
    monkeypatch.setattr(checkpoint, "_fsync", wrap(checkpoint._fsync))
    monkeypatch.setattr(ExpertAdapter, "save", wrap(ExpertAdapter.save))
    return calls


@pytest.mark.parametrize("before", [1, 2])
def test_a_kill_at_any_point_of_save_leaves_a_valid_checkpoint(tmp_path, parts, monkeypatch,
                                                               before):
    """Crash the save of step ``before`` at each of its file operations in turn: the
    loader always finds the newest complete checkpoint, and the next save works."""
    n, crashed_at = 0, []
    while True:
        n += 1
        run = tmp_path / f"crash{n}"
        for step in range(before):
            _save(run, parts, step)
        snaps = {before - 1: (_snapshot(parts), parts["scheduler"].state_dict())}
        _advance(parts)
        snaps[before] = (_snapshot(parts), parts["scheduler"].state_dict())
        with monkeypatch.context() as m:
            calls = _crash_at(m, n)
            try:
                checkpoint.save(run, step=before, **parts)
            except Crash:
                crashed_at.append(n)
            else:
                assert calls["n"] < n        # every operation has been crashed once
                break
        step = _load(run, parts)["step"]
        assert step in (before - 1, before), (n, step)
        _assert_restored(parts, *snaps[step])
        # the newest exists only once the final rename is done
        newest = run / checkpoint.CHECKPOINT
        if newest.exists():
            assert checkpoint.read_state(newest)["step"] == step
        _save(run, parts, before + 1)                 # a later save recovers
        assert _load(run, parts)["step"] == before + 1
        assert not (run / checkpoint.PARTIAL).exists()
    assert len(crashed_at) >= 8       # writes, fsyncs, the delete and both renames


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flip", "truncate"])
@pytest.mark.parametrize("name", FILES)
def test_a_corrupt_newest_falls_back_to_the_previous_with_a_warning(tmp_path, parts, name,
                                                                    damage):
    _save(tmp_path, parts, 0)
    snap0, sched0 = _snapshot(parts), parts["scheduler"].state_dict()
    _save(tmp_path, parts, 1)
    bad = tmp_path / checkpoint.CHECKPOINT / name
    damage(bad)
    with pytest.warns(UserWarning, match=rf"{re.escape(str(bad))}.*falling back to "
                                         rf".*{re.escape(checkpoint.PREVIOUS)} \(step 0\)"):
        assert checkpoint.latest(tmp_path) == tmp_path / checkpoint.PREVIOUS
    with pytest.warns(UserWarning):
        assert _load(tmp_path, parts)["step"] == 0
    _assert_restored(parts, snap0, sched0)


def test_no_valid_checkpoint_is_one_clear_error(tmp_path, parts):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.latest(tmp_path)
    _save(tmp_path, parts, 0)
    _save(tmp_path, parts, 1)
    _truncate(tmp_path / checkpoint.CHECKPOINT / "optimizer.safetensors")
    _flip_byte(tmp_path / checkpoint.PREVIOUS / "router.safetensors")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.latest(tmp_path)
    text = str(e.value)
    assert "\n" not in text
    assert f"{checkpoint.CHECKPOINT}/optimizer.safetensors" in text and "truncated" in text
    assert f"{checkpoint.PREVIOUS}/router.safetensors" in text and "--no-resume" in text


def test_an_altered_state_json_that_still_parses_is_caught(tmp_path, parts):
    _save(tmp_path, parts, 0)
    _save(tmp_path, parts, 1)
    path = tmp_path / checkpoint.CHECKPOINT / "state.json"
    state = json.loads(path.read_text())
    state["step"] = 7
    path.write_text(json.dumps(state))
    assert "digest" in checkpoint.defect(path.parent)
    with pytest.warns(UserWarning, match="state.json"):
        assert checkpoint.latest(tmp_path).name == checkpoint.PREVIOUS


def test_a_corrupt_newest_is_not_rotated_over_a_good_previous(tmp_path, parts):
    _save(tmp_path, parts, 0)
    _save(tmp_path, parts, 1)
    _flip_byte(tmp_path / checkpoint.CHECKPOINT / "rng.safetensors")
    _save(tmp_path, parts, 2)
    assert checkpoint.read_state(tmp_path / checkpoint.PREVIOUS)["step"] == 0
    assert checkpoint.read_state(tmp_path / checkpoint.CHECKPOINT)["step"] == 2


class RaiseAtCall:
    """A grade_fn that raises on its ``n``-th call (a crash inside a step)."""

    def __init__(self, n: int):
        self.calls, self.n = 0, n

    def __call__(self, problems, texts):
        if self.calls == self.n:
            raise Crash("the process died grading")
        self.calls += 1
        return scripted_verdicts(problems, texts)


def _metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / grpo.METRICS_FILE).read_text().splitlines()]


TIMING = {"gen_tokens_per_s", "time_gen_s", "time_grade_s", "time_train_s", "step_time_s"}


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_train_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path, tiny):
    cfg = load_preset("smoke", arm="vanilla", steps=3, checkpoint_every=1)
    full = tmp_path / "full"
    grpo.train(cfg, full, grade_fn=scripted_verdicts, progress=False,
               model_and_tokenizer=tiny).adapter.remove()
    run = tmp_path / "run"
    with pytest.raises(Crash):
        grpo.train(cfg, run, grade_fn=RaiseAtCall(2), progress=False, model_and_tokenizer=tiny)
    assert grpo.checkpoint_step(run) == 1
    first_row = _metric_rows(run)[0]
    _flip_byte(run / checkpoint.CHECKPOINT / "optimizer.safetensors")
    with pytest.warns(UserWarning, match="optimizer.safetensors.*falling back"):
        grpo.train(cfg, run, grade_fn=scripted_verdicts, progress=False,
                   model_and_tokenizer=tiny).adapter.remove()
    rows = _metric_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0] == first_row                  # step 0 kept, timings and all: not started over
    assert _untimed(rows) == _untimed(_metric_rows(full))
    assert grpo.checkpoint_step(run) == 2


def test_train_with_no_valid_checkpoint_stops_instead_of_starting_over(tmp_path, tiny):
    cfg = load_preset("smoke", arm="vanilla", steps=1)
    grpo.train(cfg, tmp_path, grade_fn=scripted_verdicts, progress=False,
               model_and_tokenizer=tiny).adapter.remove()
    rows = _metric_rows(tmp_path)
    _truncate(tmp_path / checkpoint.CHECKPOINT / "adapter" / "adapter.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="adapter.safetensors"):
        grpo.train(cfg, tmp_path, grade_fn=scripted_verdicts, progress=False,
                   model_and_tokenizer=tiny)
    assert _metric_rows(tmp_path) == rows        # nothing was deleted
    # starting over on purpose removes the old checkpoints with the metrics
    grpo.train(cfg, tmp_path, resume=False, grade_fn=scripted_verdicts, progress=False,
               model_and_tokenizer=tiny).adapter.remove()
    assert checkpoint.defect(tmp_path / checkpoint.CHECKPOINT) is None
    assert not (tmp_path / checkpoint.PREVIOUS).exists()
