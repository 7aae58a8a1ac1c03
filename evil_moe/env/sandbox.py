"""Isolated execution of untrusted programs: the parent side.

A :class:`Sandbox` owns a pool of worker processes (``_worker.py``, one per
CPU core by default). Each worker is a trusted fork-server living in its own
network and mount namespaces, with a jail of its own that shares no file with
any other; a pristine zygote that never sees a job forks a fresh, confined
child per program, the worker enforces the wall deadline, and the program's
whole process tree is killed afterwards. See ``_worker.py`` for the isolation
layers and for why the record stream cannot forge a pass, and the book's
sandbox page for each guarantee with the test that shows it.

A :class:`Program` is ``setup`` (trusted code, run first), ``code`` (untrusted,
run second in the same namespace) and ``calls``: expressions evaluated after
loading, each answered by one record. :meth:`Sandbox.run_many` returns one
:class:`RunResult` per program, in order.

Isolation needs Linux and root (namespaces, ``chroot``, dropping to an
unprivileged uid so that ``RLIMIT_NPROC`` applies). Where it is unavailable the
constructor raises :class:`SandboxUnavailableError`, unless the caller passed
``allow_unisolated=True``: then programs run with rlimits, their own session, a
private temp dir and a process-tree kill, but with the network, the file
system and the caller's uid; this is logged as a warning on every start.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import _worker as wire

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(wire.__file__)
UID_BASE = 1_870_000_000
"""First uid of the sandbox slots (slot n runs as uid/gid ``UID_BASE + n``).

Far above any uid a real account uses, so killing "every process of the slot
uid" can only ever reach sandboxed programs.
"""
LOCK_DIR = Path(tempfile.gettempdir()) / "evil-moe-sandbox-slots"
"""Machine-wide slot locks, shared by every grader on this machine."""


class SandboxUnavailableError(RuntimeError):
    """This machine cannot isolate programs and unisolated runs were not allowed."""


class SandboxError(RuntimeError):
    """The sandbox machinery itself failed (never caused by a program's behaviour)."""


@dataclass(frozen=True)
class Program:
    """One program to run.

    setup: trusted source run first (imports, helper classes).
    code: untrusted source run second, in the same module namespace
        (``__name__ == "__main__"``).
    calls: expressions evaluated one after another once ``code`` has loaded;
        each gets one :class:`CallOutcome`.
    want_values: send return values back (``False`` when only "did it raise"
        matters, e.g. ``run_tests()``).
    """

    setup: str
    code: str
    calls: tuple[str, ...] = ()
    want_values: bool = True


@dataclass
class CallOutcome:
    """What one call did: returned (``ok``) a wire-encoded ``value``, or raised ``error``."""

    ok: bool
    value: object = None
    error: str = ""


@dataclass
class RunResult:
    """Everything the parent learned about one program run.

    loaded: setup and code ran to the end without raising.
    calls: outcomes in call order; shorter than the program's calls when it
        timed out or died part-way.
    complete: loaded, every call answered, and the end marker seen.
    malformed: why the record stream was rejected ("" when it was fine). A
        rejected stream voids every call outcome.
    """

    loaded: bool = False
    load_error: str = ""
    calls: list[CallOutcome] = field(default_factory=list)
    complete: bool = False
    malformed: str = ""
    timed_out: bool = False
    output_limited: bool = False
    records_limited: bool = False
    exit_code: int | None = None
    output: str = ""
    wall_s: float = 0.0
    leftover_killed: int = 0

    @property
    def failure(self) -> str:
        """A short reason why the run did not answer every call ("" if it did)."""
        if self.complete:
            return ""
        if self.malformed:
            return f"rejected result stream ({self.malformed})"
        if self.timed_out:
            return "timed out"
        if self.output_limited:
            return "output limit exceeded"
        if self.records_limited:
            return "result size limit exceeded"
        if self.load_error:
            return self.load_error
        return f"exited with code {self.exit_code} before finishing"


def parse_records(raw: bytes, n_calls: int) -> tuple[bool, str, list[CallOutcome], bool, str]:
    """Validate a record stream against the harness grammar.

    Returns ``(loaded, load_error, calls, complete, malformed)``. The grammar is
    ``setup_error | load_error | loaded (value|raised){n_calls} end``; a stream
    cut short is fine (a timeout or crash), anything else (extra records,
    unknown tags, wrong arity or types, broken framing) rejects the whole
    stream: ``malformed`` says why and ``calls`` is empty.
    """
    frames = wire.split_records(raw)
    if frames is None:
        return False, "", [], False, "broken framing"
    recs = []
    for f in frames:
        try:
            r = json.loads(f)
        except (ValueError, RecursionError) as e:
            return False, "", [], False, f"undecodable record ({type(e).__name__})"
        if type(r) is not list or not r or type(r[0]) is not str:
            return False, "", [], False, "record is not a tagged list"
        recs.append(r)
    if not recs:
        return False, "", [], False, ""
    head = recs[0]
    if head[0] in ("setup_error", "load_error"):
        if len(head) != 2 or type(head[1]) is not str or len(recs) != 1:
            return False, "", [], False, f"bad {head[0]} record"
        prefix = "setup failed: " if head[0] == "setup_error" else ""
        return False, prefix + head[1], [], False, ""
    if head != ["loaded"]:
        return False, "", [], False, f"unexpected first record {head[0]!r}"
    calls: list[CallOutcome] = []
    for i, r in enumerate(recs[1:], start=1):
        if len(calls) == n_calls:
            if r == ["end"] and i == len(recs) - 1:
                return True, "", calls, True, ""
            return False, "", [], False, "records after the last call"
        if r[0] == "value" and len(r) == 2:
            calls.append(CallOutcome(ok=True, value=r[1]))
        elif r[0] == "raised" and len(r) == 2 and type(r[1]) is str:
            calls.append(CallOutcome(ok=False, error=r[1]))
        else:
            return False, "", [], False, f"unexpected record {r[0]!r} for call {len(calls)}"
    return True, "", calls, False, ""


class _WorkerProcess:
    """One fork-server subprocess and the pipe protocol to it."""

    def __init__(self, isolated: bool, tmpfs_mb: int) -> None:
        cmd = [sys.executable, "-I", "-S", str(WORKER_SCRIPT), "--uid-base", str(UID_BASE),
               "--lock-dir", str(LOCK_DIR), "--tmpfs-mb", str(tmpfs_mb)]
        if not isolated:
            cmd.append("--unisolated")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, close_fds=True)
        try:
            frame = wire.read_frame(self.proc.stdout.fileno())
        except (OSError, EOFError, ValueError) as e:
            frame, err = None, e
        else:
            err = None
        if frame is None:
            self.close()
            raise SandboxError(f"sandbox worker exited during start-up ({err or 'no reply'})")
        ready = json.loads(frame)
        if not ready.get("ok"):
            self.close()
            raise SandboxUnavailableError(ready.get("error", "unknown error"))
        self.uid: int = ready["uid"]
        self.pid: int = ready["pid"]
        self.isolated: bool = ready["isolated"]
        self.host_dir: str = ready["host_dir"]  # unisolated only: its temp dir on the host
        self.waiting_pid: int = ready["waiting_pid"]

    def run(self, job: dict) -> tuple[dict, bytes, bytes]:
        wire.write_frames(self.proc.stdin.fileno(), json.dumps(job).encode())
        fd = self.proc.stdout.fileno()
        header = wire.read_frame(fd)
        records = wire.read_frame(fd)
        output = wire.read_frame(fd)
        if header is None or records is None or output is None:
            raise EOFError("sandbox worker closed its pipe")
        header = json.loads(header)
        self.waiting_pid = header["waiting_pid"]
        return header, records, output

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF: the worker sweeps its slot and exits
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if getattr(self, "host_dir", ""):  # normally gone already; not if it was killed
            shutil.rmtree(self.host_dir, ignore_errors=True)


class Sandbox:
    """A pool of isolated workers; a context manager.

    timeout_s: wall-clock deadline of one program (its CPU limit is the next
        whole second plus one).
    memory_mb: address-space limit of one program.
    workers: parallel workers; 0 means one per CPU core.
    allow_unisolated: on machines that cannot isolate, run anyway with rlimits,
        a session, a temp dir and a tree kill only (logged as a warning).
    tmpfs_mb: size of each worker's jail file system (the program's ``/tmp``).
    """

    def __init__(self, timeout_s: float = 4.0, memory_mb: int = 1024, workers: int = 0,
                 allow_unisolated: bool = False, tmpfs_mb: int = 64) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one per core), got {workers}")
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._workers: list[_WorkerProcess] = []
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.n_workers = workers or os.cpu_count() or 1
        self._tmpfs_mb = tmpfs_mb
        self._lock = threading.Lock()
        self._idle: queue.Queue[_WorkerProcess] = queue.Queue()
        try:
            self.isolated = self._start_first(allow_unisolated)
            for _ in range(self.n_workers - 1):
                self._add_worker()
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(self.n_workers, thread_name_prefix="sandbox")

    def _start_first(self, allow_unisolated: bool) -> bool:
        reason = ""
        if not sys.platform.startswith("linux"):
            reason = f"the sandbox needs Linux namespaces; this is {sys.platform}"
        else:
            try:
                self._add_worker(isolated=True)
                return True
            except SandboxUnavailableError as e:
                reason = str(e)
        if not allow_unisolated:
            raise SandboxUnavailableError(
                f"Sandbox isolation is unavailable on this machine: {reason}. The grader runs "
                "model-written code and refuses to run it unisolated. Fix: run as root on Linux "
                "with CAP_SYS_ADMIN (in Docker: --cap-add SYS_ADMIN), or, on a machine you "
                "trust, opt out explicitly with allow_unisolated=True (preset key "
                "`allow_unisolated: true`), which keeps rlimits, a private temp dir, the wall "
                "deadline and the tree kill, but not the network or file-system isolation.")
        log.warning("SANDBOX ISOLATION IS OFF (allow_unisolated=True): %s. Model-written code "
                    "runs with this machine's network, files and uid, limited only by rlimits, "
                    "a wall deadline and a process-tree kill.", reason)
        self._add_worker(isolated=False)
        return False

    def _add_worker(self, isolated: bool | None = None) -> _WorkerProcess:
        w = _WorkerProcess(self.isolated if isolated is None else isolated, self._tmpfs_mb)
        with self._lock:
            self._workers.append(w)
        self._idle.put(w)
        return w

    @property
    def uids(self) -> list[int]:
        """The uids this pool's programs run as (isolated mode)."""
        return [w.uid for w in self._workers]

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    @property
    def waiting_pids(self) -> list[int]:
        """The confined programs waiting for their jobs, one per worker (isolated: of the
        pool's uids, the only processes alive between jobs)."""
        return [w.waiting_pid for w in self._workers]

    def _job(self, program: Program) -> dict:
        return {"setup": program.setup, "code": program.code,
                "calls": [[c, program.want_values] for c in program.calls],
                "timeout": self.timeout_s, "memory_mb": self.memory_mb}

    def _run_on_worker(self, program: Program) -> RunResult:
        job = self._job(program)
        for attempt in (1, 2):
            w = self._idle.get()
            try:
                header, records, output = w.run(job)
            except (OSError, EOFError, ValueError) as e:
                # The worker itself died (it never should). Replace it and retry once.
                with self._lock:
                    self._workers.remove(w)
                w.close()
                if attempt == 2:
                    raise SandboxError(f"sandbox worker failed twice in a row: {e}") from e
                self._add_worker()
                continue
            self._idle.put(w)
            if "sandbox_error" in header:
                raise SandboxError("could not confine a program: " + header["sandbox_error"])
            return self._result(header, records, output, len(program.calls))
        raise AssertionError("unreachable")

    @staticmethod
    def _result(header: dict, records: bytes, output: bytes, n_calls: int) -> RunResult:
        loaded, load_error, calls, complete, malformed = parse_records(records, n_calls)
        return RunResult(
            loaded=loaded, load_error=load_error, calls=calls, complete=complete,
            malformed=malformed, timed_out=header["timed_out"],
            output_limited=header["output_limited"], records_limited=header["records_limited"],
            exit_code=header.get("exit_code"), output=output.decode("utf-8", errors="replace"),
            wall_s=header["wall_s"], leftover_killed=header["leftover_killed"])

    def run(self, program: Program) -> RunResult:
        """Run one program and wait for it."""
        return self.run_many([program])[0]

    def run_many(self, programs: Sequence[Program],
                 on_done: Callable[[int], object] | None = None) -> list[RunResult]:
        """Run programs in parallel over the pool; results in input order.

        ``on_done(1)`` is called (from a pool thread) as each program finishes,
        e.g. a progress bar's ``update``.
        """
        if self._closed:
            raise SandboxError("this sandbox is closed")
        futures = [self._pool.submit(self._run_on_worker, p) for p in programs]
        if on_done is not None:
            for f in futures:
                f.add_done_callback(lambda _: on_done(1))
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop every worker (each sweeps its slot first). Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            workers, self._workers = self._workers, []
        for w in workers:
            w.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
