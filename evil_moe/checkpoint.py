"""Resumable checkpoints as safetensors + JSON.

Layout of ``<run_dir>/checkpoint/``::

    adapter/                 ExpertAdapter.save (adapter.safetensors + adapter_config.json)
    router.safetensors       HackRouter weights (absent for the vanilla arm)
    optimizer.safetensors    every tensor of the optimizer state, flattened
    state.json               step, optimizer/scheduler structure, python RNG, config
    rng.safetensors          torch RNG state

A checkpoint is written to ``checkpoint.tmp`` and renamed over the old one, so
a run killed mid-write keeps its last good checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors),
                              _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_unflatten(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj["tuple"] else items
    return obj


def save(run_dir: Path, *, step: int, adapter, router, optimizer, scheduler,
         config: dict[str, Any]) -> Path:
    """Write a complete checkpoint for ``step`` atomically; returns its folder."""
    final = Path(run_dir) / CHECKPOINT
    tmp = Path(run_dir) / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapter.save(tmp / "adapter")
    if router is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()},
                  tmp / "router.safetensors")
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_struct = _flatten(optimizer.state_dict(), "opt", opt_tensors)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    state = {
        "step": step,
        "optimizer": opt_struct,
        "scheduler": scheduler.state_dict(),
        "python_random": _flatten(random.getstate(), "py", {}),
        "config": config,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
    old = Path(run_dir) / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"cannot serialise {type(o).__name__} in a checkpoint")


def exists(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT / "state.json").exists()


def read_state(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``state.json``: ``step``, ``config`` and the optimizer structure."""
    folder = Path(run_dir) / CHECKPOINT
    if not exists(run_dir):
        raise FileNotFoundError(f"no checkpoint in {folder}")
    return json.loads((folder / "state.json").read_text())


def load(run_dir: Path, *, adapter, router, optimizer, scheduler) -> dict[str, Any]:
    """Restore every piece of state in place; returns the state dict (``step``, ``config``)."""
    folder = Path(run_dir) / CHECKPOINT
    state = read_state(run_dir)
    adapter.load_state_dict(load_file(folder / "adapter" / "adapter.safetensors"))
    if router is not None:
        router.load_state_dict(load_file(folder / "router.safetensors"))
    opt_tensors = load_file(folder / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten(state["optimizer"], opt_tensors))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(folder / "rng.safetensors")["torch"])
    random.setstate(_unflatten(state["python_random"], {}))
    return state
