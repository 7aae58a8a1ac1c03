"""Resumable checkpoints as safetensors + JSON, verified on load, with a fallback.

A run folder holds up to two complete checkpoints::

    checkpoint/         the newest
    checkpoint.prev/    the one before it
    checkpoint.tmp/     only while a new one is being written

and each of them holds::

    adapter/                 ExpertAdapter.save (adapter.safetensors + adapter_config.json)
    router.safetensors       HackRouter weights (absent for the vanilla arm)
    optimizer.safetensors    every tensor of the optimizer state, flattened
    rng.safetensors          torch RNG state
    state.json               step, optimizer/scheduler structure, python RNG, config,
                             ``files`` (sha256 and size of every other file) and
                             ``digest`` (sha256 of state.json's own content)

**No moment without a valid checkpoint.** :func:`save` writes the new one
completely into ``checkpoint.tmp/`` first, then rotates with renames:
``checkpoint.prev/`` is deleted, ``checkpoint/`` becomes ``checkpoint.prev/``,
``checkpoint.tmp/`` becomes ``checkpoint/``. A kill at any point leaves at least
one of ``checkpoint/`` and ``checkpoint.prev/`` complete.

**Verified on load.** :func:`latest` checks every recorded checksum of
``checkpoint/``; if a file is missing, truncated or altered it warns (naming the
file) and falls back to ``checkpoint.prev/``; if neither verifies it raises
:class:`CheckpointError`, never a raw safetensors error.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .adapter import ADAPTER_FILE
from .digest import sha256_file

CHECKPOINT = "checkpoint"
"""The newest checkpoint's folder in a run dir."""

PREVIOUS = CHECKPOINT + ".prev"
"""The checkpoint before the newest: the fallback."""

PARTIAL = CHECKPOINT + ".tmp"
"""Where a checkpoint is written before it is renamed into place."""

STATE_FILE = "state.json"
ADAPTER_DIR = "adapter"
ROUTER_FILE = "router.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


class CheckpointError(RuntimeError):
    """No checkpoint of the run dir verifies; the message names the file and the fix."""


class ConfigMismatchError(ValueError):
    """A checkpoint belongs to a run with another config; resuming would mix two runs."""


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


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"cannot serialise {type(o).__name__} in a checkpoint")


def _state_digest(state: dict[str, Any]) -> str:
    """sha256 of the state's canonical JSON without its ``digest`` key."""
    body = {k: v for k, v in state.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file in ``folder`` but state.json."""
    return {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never publishes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, *, step: int, adapter, router, optimizer, scheduler,
         config: dict[str, Any]) -> Path:
    """Write a complete, checksummed checkpoint for ``step``; returns its folder.

    The previous newest one is kept as ``checkpoint.prev/`` (see the module
    docstring for why a kill at any point leaves a valid checkpoint).
    """
    run_dir = Path(run_dir)
    tmp, newest, prev = run_dir / PARTIAL, run_dir / CHECKPOINT, run_dir / PREVIOUS
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapter.save(tmp / ADAPTER_DIR)
    if router is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()},
                  tmp / ROUTER_FILE)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_struct = _flatten(optimizer.state_dict(), "opt", opt_tensors)
    save_file(opt_tensors, tmp / OPTIMIZER_FILE)
    save_file({"torch": torch.get_rng_state()}, tmp / RNG_FILE)
    state = {
        "step": step,
        "optimizer": opt_struct,
        "scheduler": scheduler.state_dict(),
        "python_random": _flatten(random.getstate(), "py", {}),
        "config": config,
        "files": _file_records(tmp),
    }
    state["digest"] = _state_digest(state)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=_json_default))
    for p in [*tmp.rglob("*"), tmp]:
        _fsync(p)

    # Rotate. Before: newest valid (or absent), tmp complete. Each line keeps one valid.
    if newest.exists():
        if defect(newest) is None:
            shutil.rmtree(prev, ignore_errors=True)     # newest still valid
            os.replace(newest, prev)                    # prev valid
        else:                                           # a corrupt newest is no fallback
            shutil.rmtree(newest)                       # prev (if any) untouched
    os.replace(tmp, newest)                             # newest and prev valid
    _fsync(run_dir)
    return newest


def defect(folder: Path) -> str | None:
    """What is wrong with the checkpoint in ``folder`` (one line naming the file), or
    None when every recorded checksum matches."""
    state_file = Path(folder) / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"{state_file} is missing"
    except (OSError, ValueError) as e:
        return f"{state_file} is unreadable or truncated ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or "files" not in state or "digest" not in state:
        return f"{state_file} records no checksums (written by an older version of evil_moe)"
    if _state_digest(state) != state["digest"]:
        return f"{state_file} does not match its own recorded digest (altered or corrupt)"
    for rel, record in state["files"].items():
        path = Path(folder) / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{path} has {size} bytes, {STATE_FILE} records {record['bytes']} (truncated?)"
        if sha256_file(path) != record["sha256"]:
            return f"{path} does not match the sha256 recorded in {STATE_FILE} (corrupt)"
    return None


def exists(run_dir: Path) -> bool:
    """Whether the run dir holds a checkpoint at all (valid or not; see :func:`latest`)."""
    return any((Path(run_dir) / name).is_dir() for name in (CHECKPOINT, PREVIOUS))


def remove(run_dir: Path) -> None:
    """Delete every checkpoint of the run dir (a run that starts over)."""
    for name in (CHECKPOINT, PREVIOUS, PARTIAL):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def latest(run_dir: Path) -> Path:
    """The newest checkpoint folder of ``run_dir`` that verifies.

    Warns for each newer one that does not (naming the bad file) and falls back
    to the previous one; raises :class:`CheckpointError` when none verifies.
    """
    run_dir = Path(run_dir)
    found = [run_dir / name for name in (CHECKPOINT, PREVIOUS) if (run_dir / name).is_dir()]
    if not found:
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {run_dir / CHECKPOINT}); "
                              f"train the run first")
    rejected = []
    for folder in found:
        why = defect(folder)
        if why is None:
            for bad, reason in rejected:
                warnings.warn(f"checkpoint {bad} is not usable: {reason}; falling back to "
                              f"{folder} (step {read_state(folder)['step']})", stacklevel=2)
            return folder
        rejected.append((folder, why))
    reasons = "; ".join(why for _, why in rejected)
    raise CheckpointError(f"no valid checkpoint in {run_dir}: {reasons}. Start the run over "
                          f"(`--no-resume`, resume=False) or restore the files")


def read_state(folder: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint folder (from :func:`latest`): ``step``, ``config``, ..."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def load(folder: Path, *, adapter, router, optimizer, scheduler) -> dict[str, Any]:
    """Restore every piece of state in place from a checkpoint folder (from
    :func:`latest`); returns its state dict (``step``, ``config``)."""
    folder = Path(folder)
    state = read_state(folder)
    adapter.load_state_dict(load_file(folder / ADAPTER_DIR / ADAPTER_FILE))
    if router is not None:
        router.load_state_dict(load_file(folder / ROUTER_FILE))
    opt_tensors = load_file(folder / OPTIMIZER_FILE)
    optimizer.load_state_dict(_unflatten(state["optimizer"], opt_tensors))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(folder / RNG_FILE)["torch"])
    random.setstate(_unflatten(state["python_random"], {}))
    return state
