"""Sandbox worker: a trusted fork-server that runs untrusted programs one at a time.

This file is executed as a script, ``python -I -S _worker.py ...``, by
``evil_moe.env.sandbox``; it imports nothing but the standard library. The
parent also imports it as a module for the framing helpers and limits, so the
wire format below is defined in one place (``evil_moe.env.judge.decode_value``
is its strict decoder).

Life of a worker (isolated mode, the default; needs root):

1. Take a *slot*: an exclusive ``flock`` on ``<lock_dir>/slot-<n>.lock``. The
   slot fixes the unprivileged uid/gid ``uid_base + n`` that this worker's
   programs run as. Locks are machine-wide, so two graders (two training runs,
   a test run next to them) never share a uid; the lock dies with the process.
   Processes still running under a free slot's uid were orphaned by a killed
   worker and are killed first.
2. Enter a new mount and network namespace (``unshare``). The network namespace
   has no interface but a downed loopback: no connection can leave it. In the
   private mount namespace, build a jail on a size-limited tmpfs: read-only
   bind mounts of the interpreter's standard library (this worker's
   ``sys.path``, with any ``site-packages`` hidden) and of ``/usr`` and
   ``/lib*`` (shared libraries of extension modules), plus ``/dev/null``,
   ``/dev/zero``, ``/dev/urandom``. Nothing else of the host is visible: no
   ``/work``, ``/home``, ``/etc``, ``/proc``, no caches, datasets or
   third-party packages (of ``/root`` only the path down to the standard
   library, where pyenv keeps it). The jail's tmpfs covers the namespace's
   own ``/tmp``, so nothing is created on the host.
3. Become a child subreaper, pre-import the modules programs usually need,
   tell the parent it is ready, then serve jobs from stdin.

Each job forks a fresh child from this pristine interpreter (no model code has
ever run in it, so every program starts from the same clean state, as a fresh
interpreter would, without paying ~20 ms of interpreter start-up). The child:
new session and process group, a System V IPC namespace of its own, ``chroot``
into the jail with a new empty private ``/tmp`` as its working directory,
rlimits (address space, CPU seconds, file size, open files, processes, no
core), ``PR_SET_NO_NEW_PRIVS``, then drops to the slot uid/gid for good and
reports "confined" on a control pipe that it closes before any untrusted code
runs (a failure to confine is raised in the parent as a ``SandboxError``). It
runs the trusted ``setup`` code, then the untrusted ``code``, then evaluates
each test call and writes one record per call to fd 3. stdout and stderr share
one capped pipe.

The worker enforces the wall deadline, caps both pipes, and afterwards kills
the whole process tree: a helper that has switched to the slot uid sends
``kill(-1, SIGKILL)``, which reaches every process of that uid (daemonised
grandchildren and fork bombs included) and nothing else. Because the worker
is a subreaper, every orphaned descendant becomes its child, so "no process is
left behind" is checked exactly: after the sweep, ``waitpid`` reports no
children at all. The private ``/tmp`` is deleted after every program.

Why the records cannot forge a pass: the program runs in the same process as
the harness that writes the records, so it can write to fd 3 itself, patch the
encoder, or exit early. None of that helps. The child only ever receives test
*inputs*; expected values never enter the sandbox. The parent accepts a
stream only if it has exactly the expected grammar (one record per call, in
order, then an end marker; anything extra or malformed voids the run), decodes
values into exact builtin types (an always-equal object or an ``int`` subclass
arrives as an opaque token or as its plain underlying value), and the
comparison with expected values happens in the parent. So an accepted stream
carries the true return values for every hidden input, which is what solving
the problem means. Exit codes and stdout are never read as a verdict.

Wire format (both directions): frames of a 4-byte big-endian length and a
payload. Parent -> worker: one JSON job per frame. Worker -> parent: a JSON
header frame, the raw record bytes, the head of the program's output. Records
(inside the raw bytes, same framing) are JSON lists:
``["setup_error", msg]`` | ``["load_error", msg]`` | ``["loaded"]``, then per
call ``["value", v]`` or ``["raised", msg]``, then ``["end"]``.
Values ``v``: ``null``/``true``/``false``/numbers/strings are themselves; a
JSON list is a tagged value: ``["l", items]`` list, ``["t", items]`` tuple,
``["s", items]`` set, ``["f", items]`` frozenset, ``["d", [[k, v], ...]]``
dict, ``["b", latin1]`` bytes, ``["c", re, im]`` complex, ``["I", hex]`` huge
int, ``["N", values]`` a linked list (``ListNode``), ``["T", level_order]`` a
binary tree (``TreeNode``), ``["?", type_name]`` anything else (opaque).
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import sys
import time

# ---- wire format (shared with the parent) ----------------------------------------------

FRAME = struct.Struct(">I")
MAX_FRAME = 256 << 20            # a job or reply frame larger than this is a protocol error
RECORD_CAP = 32 << 20            # record bytes kept from one program; more is a failed run
OUTPUT_KEEP = 4096               # head of stdout+stderr kept for diagnostics
OUTPUT_CAP = 4 << 20             # total program output allowed before it is killed
ENCODE_MAX_DEPTH = 200           # nesting depth of one return value
ENCODE_MAX_ITEMS = 2_000_000     # scalars + containers in one return value
BIGINT_BITS = 12_000             # ints wider than this travel as hex (JSON ints stay < 4300 digits)
LINKED_MAX = 1_000_000           # nodes walked in a ListNode / TreeNode before calling it cyclic


class EncodeError(Exception):
    """A return value cannot be sent back (too deep, too large, cyclic)."""


def encode_value(value: object) -> object:
    """A JSON-ready tagged form of ``value``, see the module docstring.

    Builtin subclasses (``Counter``, ``OrderedDict``, ``IntEnum``, a hostile
    ``int`` subclass) are read through the *base* type's own methods, so what
    is sent is the plain underlying data and no overridden ``__eq__`` survives.
    """
    budget = [ENCODE_MAX_ITEMS]

    def enc(v: object, depth: int) -> object:
        budget[0] -= 1
        if budget[0] < 0:
            raise EncodeError("return value has too many elements")
        if depth > ENCODE_MAX_DEPTH:
            raise EncodeError("return value is nested too deeply (or is cyclic)")
        t = type(v)
        if v is None or t is bool:
            return v
        if isinstance(v, int):
            i = int.__int__(v) if t is not int else v
            return i if i.bit_length() <= BIGINT_BITS else ["I", hex(i)]
        if isinstance(v, float):
            return float.__float__(v) if t is not float else v
        if isinstance(v, str):
            return str.__str__(v) if t is not str else v
        if isinstance(v, (bytes, bytearray)):
            return ["b", bytes(v).decode("latin-1")]
        if isinstance(v, complex):
            c = complex.__complex__(v) if t is not complex else v
            return ["c", c.real, c.imag]
        if isinstance(v, list):
            return ["l", [enc(x, depth + 1) for x in list.__iter__(v)]]
        if isinstance(v, tuple):
            return ["t", [enc(x, depth + 1) for x in tuple.__iter__(v)]]
        if isinstance(v, frozenset):
            return ["f", [enc(x, depth + 1) for x in frozenset.__iter__(v)]]
        if isinstance(v, set):
            return ["s", [enc(x, depth + 1) for x in set.__iter__(v)]]
        if isinstance(v, dict):
            return ["d", [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in dict.items(v)]]
        name = t.__name__
        if name == "ListNode":
            vals, node, seen = [], v, 0
            while node is not None:
                seen += 1
                if seen > LINKED_MAX:
                    raise EncodeError("ListNode chain is too long or cyclic")
                vals.append(enc(node.val, depth + 1))
                node = node.next
            return ["N", vals]
        if name == "TreeNode":
            return ["T", _tree_level_order(v, lambda x: enc(x, depth + 1))]
        return ["?", name[:100]]

    return enc(value, 0)


def _tree_level_order(root: object, enc) -> list:
    """LeetCode's level order with ``None`` holes, trailing ``None`` trimmed.

    This is exactly the list that the usual ``tree_node(values)`` helper turns
    back into the same tree.
    """
    out = [enc(root.val)]
    queue, head, seen = [root], 0, 1
    while head < len(queue):
        node = queue[head]
        head += 1
        for child in (node.left, node.right):
            if child is None:
                out.append(None)
            else:
                seen += 1
                if seen > LINKED_MAX:
                    raise EncodeError("TreeNode is too large or cyclic")
                out.append(enc(child.val))
                queue.append(child)
    while out and out[-1] is None:
        out.pop()
    return out


def read_frame(fd: int) -> bytes | None:
    """One frame from a blocking fd; ``None`` on a clean EOF before the frame."""
    head = _read_exact(fd, FRAME.size)
    if head is None:
        return None
    (n,) = FRAME.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds the {MAX_FRAME} byte limit")
    body = _read_exact(fd, n)
    if body is None:
        raise EOFError("stream ended inside a frame")
    return body


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            if got == 0:
                return None
            raise EOFError("stream ended inside a frame")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def write_frames(fd: int, *payloads: bytes) -> None:
    data = b"".join(FRAME.pack(len(p)) + p for p in payloads)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def split_records(raw: bytes) -> list[bytes] | None:
    """The record payloads in ``raw``; ``None`` if the framing is broken."""
    out, i = [], 0
    while i < len(raw):
        if i + FRAME.size > len(raw):
            return None
        (n,) = FRAME.unpack_from(raw, i)
        i += FRAME.size
        if i + n > len(raw):
            return None
        out.append(raw[i:i + n])
        i += n
    return out


# ---- the harness that runs inside the sandboxed child -----------------------------------

RESULT_FD = 3
CONTROL_FD = 4  # child -> worker only: "confinement done"; closed before any untrusted code runs


def _describe(exc: BaseException) -> str:
    try:
        msg = str(exc)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        msg = "<unprintable>"
    return f"{type(exc).__name__}: {msg}"[:500]


def run_harness(setup_code, code: str, calls: list) -> None:
    """Run one program and stream its records to ``RESULT_FD``.

    ``setup_code`` is a compiled, trusted prefix; ``code`` is the untrusted
    source; ``calls`` is a list of ``[expression_source, want_value]``. Every
    reference the harness needs is bound before untrusted code runs.
    """
    write, dumps, pack = os.write, json.dumps, FRAME.pack
    enc_value, describe = encode_value, _describe

    def emit(record: list) -> None:
        data = dumps(record, allow_nan=True, separators=(",", ":")).encode()
        view = memoryview(pack(len(data)) + data)
        while view:
            view = view[write(RESULT_FD, view):]

    compiled_calls = [(compile(src, "<test>", "eval"), want) for src, want in calls]
    ns: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(setup_code, ns)
    except BaseException as e:  # noqa: BLE001
        emit(["setup_error", describe(e)])
        return
    try:
        exec(compile(code, "<solution>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - SystemExit at top level is a load failure
        emit(["load_error", describe(e)])
        return
    emit(["loaded"])
    for expr, want in compiled_calls:
        try:
            value = eval(expr, ns)
            record = ["value", enc_value(value) if want else None]
        except BaseException as e:  # noqa: BLE001 - sys.exit() inside the function fails the call
            record = ["raised", describe(e)]
        emit(record)
    emit(["end"])


# ---- the fork-server ------------------------------------------------------------------

PRELOAD = ("random functools collections string math datetime typing itertools heapq bisect "
           "operator re copy json fractions decimal statistics array")

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
MAX_SLOTS = 4096


class Worker:
    """The fork-server state: isolation settings, slot, jail."""

    def __init__(self, isolated: bool, uid_base: int, lock_dir: str, tmpfs_mb: int) -> None:
        self.isolated = isolated
        self.uid = self.gid = -1
        self.jail = ""
        self.workdir = ""
        self._libc = None
        self._lock_fd = -1
        self._setup_cache: dict[str, object] = {}
        self._pid = os.getpid()
        if isolated:
            self._isolate(uid_base, lock_dir, tmpfs_mb)
        else:
            import tempfile
            self.jail = tempfile.mkdtemp(prefix="evil-moe-unisolated-")
        self._prctl(PR_SET_CHILD_SUBREAPER, 1)
        for name in PRELOAD.split():
            __import__(name)

    # -- setup ---------------------------------------------------------------------------

    def _call(self, fn: str, *args) -> int:
        import ctypes
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
        r = getattr(self._libc, fn)(*args)
        if r != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{fn}{args!r}: {os.strerror(err)}")
        return r

    def _prctl(self, option: int, value: int) -> None:
        import ctypes
        self._call("prctl", option, ctypes.c_ulong(value), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0))

    def _mount(self, src: str | None, dst: str, fstype: str | None, flags: int,
               data: str | None = None) -> None:
        import ctypes
        enc = (lambda s: s.encode() if s is not None else None)
        self._call("mount", enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data))

    def _take_slot(self, uid_base: int, lock_dir: str) -> None:
        import fcntl
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        for slot in range(MAX_SLOTS):
            fd = os.open(os.path.join(lock_dir, f"slot-{slot}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._lock_fd, self.uid, self.gid = fd, uid_base + slot, uid_base + slot
            self._sweep_stale()
            return
        raise RuntimeError(f"no free sandbox slot among {MAX_SLOTS} in {lock_dir}")

    def _sweep_stale(self) -> None:
        """Kill what a killed predecessor on this slot left running.

        The slot's lock was free, so no worker owns these processes: they are
        programs orphaned when their worker was SIGKILLed mid-run.
        """
        give_up = time.monotonic() + 5.0
        while _processes_of_uid(self.uid):
            if time.monotonic() > give_up:
                raise RuntimeError(f"stale processes of uid {self.uid} survive SIGKILL")
            self._kill_tree(-1)
            time.sleep(0.01)

    def _isolate(self, uid_base: int, lock_dir: str, tmpfs_mb: int) -> None:
        if os.geteuid() != 0:
            raise PermissionError("isolation needs root (to create namespaces and drop to an "
                                  f"unprivileged uid); this worker runs as uid {os.geteuid()}")
        self._take_slot(uid_base, lock_dir)
        self._call("unshare", CLONE_NEWNS | CLONE_NEWNET)
        self._mount(None, "/", None, MS_REC | MS_PRIVATE)
        # The jail's file system covers this namespace's /tmp, which the worker no longer
        # needs (its slot lock is open already): nothing is created on the host, and the
        # jail disappears with the namespace however the worker ends.
        self.jail = "/tmp"
        self._mount("tmpfs", self.jail, "tmpfs", MS_NOSUID | MS_NODEV,
                    f"size={tmpfs_mb}m,mode=755")
        ro = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        stdlib = [p for p in sys.path if p and os.path.exists(p)]
        for path in stdlib + ["/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin"]:
            if not os.path.exists(path) or self._inside_jail_already(path, stdlib):
                continue
            target = self.jail + path
            if os.path.islink(path):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(os.readlink(path), target)
                continue
            if os.path.isdir(path):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "w").close()
            self._mount(path, target, None, MS_BIND | MS_REC)
            self._mount(None, target, None, ro)
            site = os.path.join(target, "site-packages")
            if os.path.isdir(site):  # the standard library only: hide third-party packages
                self._mount("tmpfs", site, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1k")
        os.makedirs(self.jail + "/dev")
        for dev in ("null", "zero", "urandom"):
            target = f"{self.jail}/dev/{dev}"
            open(target, "w").close()
            self._mount(f"/dev/{dev}", target, None, MS_BIND)
        self.workdir = self.jail + "/tmp"

    @staticmethod
    def _inside_jail_already(path: str, stdlib: list[str]) -> bool:
        """True if ``path`` lies under another path that is bound anyway."""
        parents = [p for p in stdlib + ["/usr"] if p != path]
        return any(path.startswith(p.rstrip("/") + "/") for p in parents)

    # -- one program -----------------------------------------------------------------------

    def run(self, job: dict) -> tuple[dict, bytes, bytes]:
        setup_src = job["setup"]
        setup_code = self._setup_cache.get(setup_src)
        if setup_code is None:
            setup_code = compile(setup_src, "<setup>", "exec")
            if len(self._setup_cache) > 64:
                self._setup_cache.clear()
            self._setup_cache[setup_src] = setup_code
        timeout = float(job["timeout"])
        workdir = self._fresh_workdir()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # ---- child: never returns
            try:
                os.close(res_r)
                os.close(out_r)
                os.close(ctl_r)
                try:
                    self._enter_sandbox(job, workdir, res_w, out_w, ctl_w, timeout)
                except BaseException as e:  # noqa: BLE001 - reported on the control pipe
                    os.write(CONTROL_FD, b"\0" + _describe(e).encode())
                    raise
                # Confinement is complete. Say so on the control pipe and close it, so the
                # program can neither forge nor suppress this signal.
                os.write(CONTROL_FD, b"\1")
                os.close(CONTROL_FD)
                run_harness(setup_code, job["code"], job["calls"])
            finally:
                try:
                    sys.stdout.flush()
                except BaseException:  # noqa: BLE001 - the program may have replaced stdout
                    pass
                os._exit(0)
        os.close(res_w)
        os.close(out_w)
        os.close(ctl_w)
        header, records, output = self._supervise(pid, res_r, out_r, start + timeout)
        control = os.read(ctl_r, 4096)  # every writer is dead: returns at once
        if control.startswith(b"\0"):
            header["sandbox_error"] = control[1:].decode(errors="replace")
        elif not control and not header["timed_out"]:
            header["sandbox_error"] = "the child died before its sandbox was set up"
        for fd in (res_r, out_r, ctl_r):
            os.close(fd)
        header["wall_s"] = round(time.monotonic() - start, 6)
        self._remove_workdir(workdir)
        return header, records, output

    def _fresh_workdir(self) -> str:
        import shutil
        if self.isolated:
            path = self.workdir
            if os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)
            os.mkdir(path, 0o700)
            os.chown(path, self.uid, self.gid)
            return path
        import tempfile
        return tempfile.mkdtemp(prefix="run-", dir=self.jail)

    def _remove_workdir(self, path: str) -> None:
        import shutil
        shutil.rmtree(path, ignore_errors=True)

    def _enter_sandbox(self, job: dict, workdir: str, res_w: int, out_w: int, ctl_w: int,
                       timeout: float) -> None:
        """Child side: confine this process, then return to run the harness.

        Afterwards fd 0 is /dev/null, fds 1 and 2 the output pipe, ``RESULT_FD``
        the record pipe, ``CONTROL_FD`` the control pipe; nothing else is open.
        """
        import resource
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if self.isolated:
            # A System V IPC namespace of its own: shared memory or message queues the
            # program creates die with it instead of outliving it or reaching other programs.
            self._call("unshare", CLONE_NEWIPC)
            os.chroot(self.jail)
            os.chdir("/tmp")
        else:
            os.chdir(workdir)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        import fcntl
        ctl = fcntl.fcntl(ctl_w, fcntl.F_DUPFD, 16)  # clear of fds 3 and 4 before placing them
        res = fcntl.fcntl(res_w, fcntl.F_DUPFD, 16)
        os.dup2(res, RESULT_FD)
        os.dup2(ctl, CONTROL_FD)
        os.closerange(CONTROL_FD + 1, 1 << 16)
        mem = int(job["memory_mb"]) << 20
        cpu = int(math.ceil(timeout)) + 1
        limits = [(resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                  (resource.RLIMIT_FSIZE, int(job.get("fsize_mb", 16)) << 20),
                  (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
        if self.isolated:
            limits.append((resource.RLIMIT_NPROC, int(job.get("nproc", 32))))
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        self._prctl(PR_SET_NO_NEW_PRIVS, 1)
        if self.isolated:
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
        # After the uid change, which clears it: die with the worker.
        self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self._pid:
            raise RuntimeError("the sandbox worker died while a program was starting")
        home = "/tmp" if self.isolated else workdir
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home,
                           "LANG": "C.UTF-8"})
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: prints survive _exit
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.stdin = open(0, "r", closefd=False)
        import random
        random.seed()  # like a fresh interpreter: children do not share the server's stream

    def _supervise(self, pid: int, res_r: int, out_r: int, deadline: float):
        """Collect output until the child exits or the deadline; then kill the tree."""
        import select
        records, output = bytearray(), bytearray()
        out_total = 0
        status = {"timed_out": False, "output_limited": False, "records_limited": False}
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        for fd in (res_r, out_r, pidfd):
            poller.register(fd, select.POLLIN)
        open_fds = {res_r, out_r}
        exited = False
        while not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status["timed_out"] = True
                break
            for fd, _ in poller.poll(max(1, int(remaining * 1000))):
                if fd == pidfd:
                    exited = True
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                elif fd == res_r:
                    records += chunk
                else:
                    out_total += len(chunk)
                    if len(output) < OUTPUT_KEEP:
                        output += chunk[:OUTPUT_KEEP - len(output)]
            if len(records) > RECORD_CAP:
                status["records_limited"] = True
                break
            if out_total > OUTPUT_CAP:
                status["output_limited"] = True
                break
        os.close(pidfd)
        # Stop everything that is still running, then collect what is left in the pipes.
        if not exited:
            self._kill_tree(pid)
        _, wstatus = os.waitpid(pid, 0)
        status["exit_code"] = os.waitstatus_to_exitcode(wstatus)
        status["leftover_killed"] = self._reap_all(pid)
        for fd in open_fds:
            while len(records) <= RECORD_CAP:
                chunk = os.read(fd, 1 << 16)  # every writer is dead: this ends at EOF
                if not chunk:
                    break
                if fd == res_r:
                    records += chunk
                elif len(output) < OUTPUT_KEEP:
                    output += chunk[:OUTPUT_KEEP - len(output)]
        if len(records) > RECORD_CAP:
            status["records_limited"] = True
            del records[RECORD_CAP:]
        return status, bytes(records), bytes(output)

    def _kill_tree(self, pid: int) -> None:
        """SIGKILL the program's whole tree, descendants that left its session included."""
        if self.isolated:
            helper = os.fork()
            if helper == 0:
                try:
                    os.setresgid(self.gid, self.gid, self.gid)
                    os.setresuid(self.uid, self.uid, self.uid)
                    os.kill(-1, signal.SIGKILL)  # every process of the slot uid, except this one
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        else:
            if pid > 0:
                try:
                    os.killpg(pid, signal.SIGKILL)  # the program's own session and group
                except ProcessLookupError:
                    pass
            for child in _children_of(os.getpid()):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _reap_all(self, main_pid: int) -> int:
        """Kill and reap every remaining descendant; returns how many there were.

        As a subreaper, this process inherits every orphan of the program, so an
        empty ``waitpid`` (ECHILD) proves that no process of the program is left.
        """
        reaped, killed_at = 0, None
        give_up = time.monotonic() + 5.0
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid:
                reaped += 1
                continue
            now = time.monotonic()
            if now > give_up:
                raise RuntimeError("sandboxed processes survived SIGKILL for 5 s")
            if killed_at is None or now - killed_at > 0.05:
                self._kill_tree(main_pid)
                killed_at = now
            time.sleep(0.001)

    def close(self) -> None:
        try:
            self._reap_all(-1)
        finally:
            if not self.isolated:  # an isolated jail vanishes with the mount namespace
                import shutil
                shutil.rmtree(self.jail, ignore_errors=True)


def _proc_files(name: str):
    """``(pid, text of /proc/<pid>/<name>)`` for every process still there when read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/{name}") as f:
                yield int(entry), f.read()
        except OSError:                # the process ended between listdir and open
            continue


def _processes_of_uid(uid: int) -> list[int]:
    """Pids of live (not zombie) processes whose real uid is ``uid`` (from /proc)."""
    out = []
    for pid, text in _proc_files("status"):
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and \
                fields.get("State", "").split()[0] not in ("Z", "X"):
            out.append(pid)
    return out


def _children_of(ppid: int) -> list[int]:
    """Pids of the processes whose parent is ``ppid`` (from /proc/<pid>/stat)."""
    return [pid for pid, text in _proc_files("stat")
            if int(text.rsplit(")", 1)[1].split()[1]) == ppid]


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unisolated", action="store_true")
    ap.add_argument("--uid-base", type=int, required=True)
    ap.add_argument("--lock-dir", required=True)
    ap.add_argument("--tmpfs-mb", type=int, default=64)
    args = ap.parse_args(argv)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    try:
        worker = Worker(not args.unisolated, args.uid_base, args.lock_dir, args.tmpfs_mb)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it loudly
        error = f"{type(e).__name__}: {e}"
        write_frames(stdout, json.dumps({"ok": False, "error": error}).encode())
        return 1
    host_dir = "" if worker.isolated else worker.jail  # what to remove if this worker is killed
    write_frames(stdout, json.dumps({"ok": True, "uid": worker.uid, "pid": os.getpid(),
                                     "isolated": worker.isolated,
                                     "host_dir": host_dir}).encode())
    try:
        while True:
            frame = read_frame(stdin)
            if frame is None:
                return 0
            header, records, output = worker.run(json.loads(frame))
            write_frames(stdout, json.dumps(header).encode(), records, output)
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
