"""Sandbox worker: a trusted fork-server that runs untrusted programs one at a time.

This file is executed as a script, ``python -I -S _worker.py ...``, by
``evil_moe.env.sandbox``; it imports nothing but the standard library. The
parent also imports it as a module for the framing helpers and limits, so the
wire format below is defined in one place (``evil_moe.env.judge.decode_value``
is its strict decoder).

Life of a worker (isolated mode, the default; needs root):

1. Check that the seccomp filter (``seccomp_filter``) installs and holds, in a
   throwaway child; fail at start if not.
2. Take a *slot*: an exclusive ``flock`` on ``<lock_dir>/slot-<n>.lock``. The
   slot fixes the unprivileged uid/gid ``uid_base + n`` that this worker's
   programs run as. Locks are machine-wide, so two graders (two training runs,
   a test run next to them) never share a uid; the lock dies with the process.
   Processes still running under a free slot's uid were orphaned by a killed
   worker and are killed first.
3. Enter a new mount and network namespace (``unshare``). The network namespace
   has no interface but a downed loopback: no connection can leave it, and no
   port or abstract socket is shared with another worker. In the private mount
   namespace, build the jail on a tmpfs of its own: a *copy* of the standard
   library (no ``site-packages``) and of the extension modules with the shared
   libraries they load, then remounted read-only and ``noatime``. Nothing else
   of the host is visible: no ``/work``, ``/home``, ``/etc``, ``/proc``,
   ``/dev``, no binaries, caches, datasets or third-party packages, and no
   inode is shared with the host or another jail.
4. Pre-import the modules programs usually need, then fork the *zygote* and
   tell the parent it is ready. Serve jobs from stdin.

The zygote is forked before the first job and never sees one. It keeps one
program waiting: it mounts a fresh, empty tmpfs as the jail's ``/tmp``, forks
the program and hands the worker the other ends of its pipes (job, result,
output, control) over a socket. The program confines itself at once, before
any job exists for it: new session and process group, a System V IPC namespace
of its own, ``chroot`` into the jail with its fresh ``/tmp`` as working
directory, stdin an empty pipe, no core dumps, ``RLIMIT_NPROC``,
``PR_SET_NO_NEW_PRIVS``, the slot uid/gid for good, and the seccomp filter (no
keyrings, the one kernel store that outlives a uid's processes; no ptrace or
cross-process memory access; no io_uring; only the socket families the network
namespace confines). Then it waits. The worker writes the job straight into
the job pipe; the program reads it, sets the job's limits (address space, CPU
seconds, file size, open files: lowering limits needs no privilege) and
reports "confined" on a control pipe that it closes before any untrusted code
runs (a failure to confine is raised in the parent as a ``SandboxError``). So
a job only ever enters a process that is already jailed, and every program is
forked from a process that holds nothing of any earlier program (no code,
inputs, results), as if from a fresh interpreter, without paying ~20 ms of
interpreter start-up. It runs the trusted ``setup`` code, then the untrusted
``code``, then evaluates each test call and writes one record per call to
fd 3. stdout and stderr share one capped pipe.

The worker enforces the wall deadline and caps both pipes; at the deadline it
tells the zygote to kill. The zygote kills the program's whole process tree:
a helper that has switched to the slot uid sends ``kill(-1, SIGKILL)``, which
reaches every process of that uid (daemonised grandchildren and fork bombs
included) and nothing else. Because the zygote is a subreaper, every orphaned
descendant becomes its child, so "no process is left behind" is checked
exactly: after the sweep, ``waitpid`` reports no children at all. Only then
does it report the exit code to the worker and prepare the next program.

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
    write_all(fd, b"".join(FRAME.pack(len(p)) + p for p in payloads))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
JOB_FD = 5      # worker -> child: the job; closed once read, before any untrusted code runs
NPROC = 32      # processes the slot uid may have at once (RLIMIT_NPROC)


def _describe(exc: BaseException) -> str:
    try:
        msg = str(exc)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        msg = "<unprintable>"
    return f"{type(exc).__name__}: {msg}"[:500]


def run_harness(setup: str, code: str, calls: list) -> None:
    """Run one program and stream its records to ``RESULT_FD``.

    ``setup`` is the trusted prefix's source; ``code`` is the untrusted
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
        exec(compile(setup, "<setup>", "exec"), ns)
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
EXTENSIONS_SKIP = ("_test", "xx", "_ctypes_test", "_tkinter", "readline", "_curses")
"""Extension modules (name prefixes) left out of the jail: test modules and terminal or
GUI bindings."""
STDLIB_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                         "pydoc_data", "distutils", "__phello__", "site-packages", "lib-dynload"})
"""Top-level folders of the standard library left out of the jail's copy."""

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_BIND, MS_REC, MS_PRIVATE = 32, 1024, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
SECCOMP_MODE_FILTER = 2
MAX_SLOTS = 4096
KILL_HELPER_S = 0.5  # how long the kill helper may take before the zygote kills by pid

SECCOMP_DENIED = {
    # machine: (AUDIT_ARCH_* value, {system call: number}); io_uring has one number everywhere
    "x86_64": (0xC000003E, {"ptrace": 101, "add_key": 248, "request_key": 249, "keyctl": 250,
                            "perf_event_open": 298, "process_vm_readv": 310,
                            "process_vm_writev": 311, "bpf": 321, "userfaultfd": 323,
                            "io_uring_setup": 425, "io_uring_enter": 426,
                            "io_uring_register": 427}),
    "aarch64": (0xC00000B7, {"ptrace": 117, "add_key": 217, "request_key": 218, "keyctl": 219,
                             "perf_event_open": 241, "process_vm_readv": 270,
                             "process_vm_writev": 271, "bpf": 280, "userfaultfd": 282,
                             "io_uring_setup": 425, "io_uring_enter": 426,
                             "io_uring_register": 427}),
}
"""System calls a program may not make (they fail with EPERM).

Keyrings (``add_key``, ``request_key``, ``keyctl``) are the one kernel store an
unprivileged uid can fill that outlives its processes: a key left in the slot
uid's user keyring would reach the next program of the slot. The rest are
ways to look into or share memory with other processes, and io_uring, whose
operations bypass this filter.
"""
SOCKET_NR = {"x86_64": 41, "aarch64": 198}
SOCKET_FAMILIES = (1, 2, 10)
"""AF_UNIX, AF_INET, AF_INET6: the socket families a program may create. The program's own
network namespace confines these; others (AF_VSOCK to a virtual machine's host, for one) are
not confined by it."""


def seccomp_filter(machine: str) -> bytes:
    """The classic-BPF program of the sandbox's seccomp filter, for ``machine`` (``uname -m``).

    In order: a system call of another ABI (32-bit or x32 on x86_64) fails; a call in
    ``SECCOMP_DENIED`` fails; ``socket(family, ...)`` fails unless ``family`` is in
    ``SOCKET_FAMILIES``; everything else is allowed. "Fails" is ``SECCOMP_RET_ERRNO``
    with EPERM. Instructions are ``struct sock_filter`` (code, jump-if-true,
    jump-if-false, constant); jumps count the instructions skipped.
    """
    if machine not in SECCOMP_DENIED:
        raise RuntimeError(f"the sandbox's system-call filter knows x86_64 and aarch64, not "
                           f"{machine!r}")
    arch, numbers = SECCOMP_DENIED[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06          # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    deny, allow = 0x00050000 | 1, 0x7FFF0000            # SECCOMP_RET_ERRNO | EPERM, RET_ALLOW
    ops = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny),   # seccomp_data.arch
           (ld, 0, 0, 0)]                                          # seccomp_data.nr
    if machine == "x86_64":
        ops += [(jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]        # the x32 ABI's numbers
    for nr in sorted(numbers.values()):
        ops += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
    unix, inet, inet6 = SOCKET_FAMILIES
    ops += [(jeq, 0, 5, SOCKET_NR[machine]),
            (ld, 0, 0, 16),                                        # low word of args[0]
            (jeq, 3, 0, unix), (jeq, 2, 0, inet), (jeq, 1, 0, inet6),
            (ret, 0, 0, deny),
            (ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *op) for op in ops)


class Worker:
    """The fork-server: slot, jail and the zygote that forks every program.

    Two processes share this object's code. The *worker* talks to the parent,
    holds each job while it runs, hands it to the waiting program, supervises it
    and sends its results back. The *zygote* is forked from the worker once,
    before the first job, and only ever forks programs and reaps them: it never
    sees a job, so no program's code, inputs or results ever enter its memory,
    and every program, forked from it, starts from a state that holds nothing of
    any earlier program.
    """

    def __init__(self, isolated: bool, uid_base: int, lock_dir: str, tmpfs_mb: int) -> None:
        self.isolated = isolated
        self.tmpfs_mb = tmpfs_mb
        self.uid = self.gid = -1
        self.jail = ""
        self._libc = None
        self._lock_fd = -1
        self._seccomp = None
        self._pid = os.getpid()       # in the zygote and its programs: the zygote's pid
        if isolated:
            self._isolate(uid_base, lock_dir)
        else:
            import tempfile
            self.jail = tempfile.mkdtemp(prefix="evil-moe-unisolated-")
        self._preload()
        self._next = 0                # the program the zygote has waiting for its job
        self._zygote_pid, self._sock = self._start_zygote()
        self.waiting_pid, self._waiting = self._receive_program()

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

    def _build_seccomp(self) -> None:
        """The filter for this machine, as the ``struct sock_fprog`` that prctl takes."""
        import ctypes

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        code = seccomp_filter(os.uname().machine)
        buf = ctypes.create_string_buffer(code, len(code))
        self._seccomp = (SockFprog(len(code) // 8, ctypes.addressof(buf)), buf)

    def _install_seccomp(self) -> None:
        import ctypes
        self._call("prctl", PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
                   ctypes.byref(self._seccomp[0]), ctypes.c_ulong(0), ctypes.c_ulong(0))

    def _check_seccomp(self) -> None:
        """Install the filter in a throwaway child and see ``keyctl`` fail: fail at start if not."""
        import ctypes
        keyctl = SECCOMP_DENIED[os.uname().machine][1]["keyctl"]
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                self._prctl(PR_SET_NO_NEW_PRIVS, 1)
                self._install_seccomp()
                libc = ctypes.CDLL(None, use_errno=True)
                r = libc.syscall(keyctl, 0, -4, 0, 0, 0)  # KEYCTL_GET_KEYRING_ID, user keyring
                code = 0 if r == -1 and ctypes.get_errno() == 1 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("the seccomp filter could not be installed or does not hold "
                               f"(test child exit status {os.waitstatus_to_exitcode(status)})")

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

    def _isolate(self, uid_base: int, lock_dir: str) -> None:
        if os.geteuid() != 0:
            raise PermissionError("isolation needs root (to create namespaces and drop to an "
                                  f"unprivileged uid); this worker runs as uid {os.geteuid()}")
        self._build_seccomp()
        self._check_seccomp()
        self._take_slot(uid_base, lock_dir)
        self._call("unshare", CLONE_NEWNS | CLONE_NEWNET)
        self._mount(None, "/", None, MS_REC | MS_PRIVATE)
        self._build_jail()

    def _build_jail(self) -> None:
        """A private, read-only copy of the standard library on this worker's own tmpfs.

        The jail's file system covers this namespace's /tmp, which the worker no
        longer needs (its slot lock is open already): nothing is created on the
        host, and the jail disappears with the namespace however the worker ends.
        Every file is a *copy* (``copy2`` keeps modification times, so the
        ``.pyc`` caches stay valid): no inode is shared with the host or with
        another worker's jail, so no lock, lease or inotify watch a program
        places can be seen by a program of another jail. Read-only and
        ``noatime``: a program can change nothing in it, not even access times,
        that the next program could read. Extension modules (``lib-dynload``) are
        copied with the shared libraries they load; there is no ``/dev``.
        """
        import shutil
        import sysconfig
        libraries = self._extension_files()  # before /tmp is covered: nothing is read from it
        self.jail = "/tmp"
        self._mount("tmpfs", self.jail, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
        stdlib = sysconfig.get_paths()["stdlib"]
        pyc = f".{sys.implementation.cache_tag}.pyc"
        for root, dirs, files in os.walk(stdlib):
            if root == stdlib:
                dirs[:] = [d for d in dirs if d not in STDLIB_SKIP and not d.startswith("config-")]
            os.makedirs(self.jail + root, mode=0o755, exist_ok=True)
            for name in files:
                if name.endswith((".py", pyc)):
                    shutil.copy2(os.path.join(root, name), os.path.join(self.jail + root, name))
        for path in libraries:
            os.makedirs(os.path.dirname(self.jail + path), mode=0o755, exist_ok=True)
            if os.path.islink(path):
                os.symlink(os.readlink(path), self.jail + path)
            else:
                shutil.copy2(path, self.jail + path)
        for path in sys.path:  # on sys.path, if empty in the jail
            if path and os.path.isdir(path):
                os.makedirs(self.jail + path, mode=0o755, exist_ok=True)
        os.mkdir(self.jail + "/tmp", 0o755)  # mount point of each program's own tmpfs
        self._mount(None, self.jail, None,
                    MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOATIME)

    def _preload(self) -> None:
        """Import what programs usually need, before the zygote forks.

        Only these: every extension module and library mapped into the zygote
        would be copied at every fork (importing them all makes a fork and exit
        twice as slow); the others load from the jail when a program asks.
        """
        for name in PRELOAD.split():
            __import__(name)

    @staticmethod
    def _extension_files() -> list[str]:
        """The extension modules and every shared library they load, as mapped files.

        A throwaway child imports every extension module and reports the files in
        its ``/proc/self/maps``; that is exactly what the dynamic loader needs.
        """
        import sysconfig
        import warnings
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                dynload = sysconfig.get_config_var("DESTSHARED") or ""
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a few are deprecated
                    for entry in sorted(os.listdir(dynload)) if os.path.isdir(dynload) else []:
                        name = entry.split(".", 1)[0]
                        if entry.endswith(".so") and not name.startswith(EXTENSIONS_SKIP):
                            try:
                                __import__(name)
                            except ImportError:  # its library is missing here: in the jail too
                                pass
                with open("/proc/self/maps", "rb") as f:
                    write_frames(w, f.read())
            finally:
                os._exit(0)
        os.close(w)
        try:
            maps = read_frame(r) or b""
        finally:
            os.close(r)
            os.waitpid(pid, 0)
        files = set()
        for line in maps.decode(errors="replace").splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
                files.add(fields[5])
        files = {f for f in files if os.path.isfile(f)}
        # The loader asks for a library by its soname, usually a symlink to the mapped file.
        for folder in {os.path.dirname(f) for f in files}:
            for entry in os.scandir(folder):
                if entry.is_symlink() and os.path.realpath(entry.path) in files:
                    files.add(entry.path)
        return sorted(files)

    def _start_zygote(self):
        import socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # ---- the zygote: never returns
            code = 1
            try:
                ours.close()
                keep = theirs.fileno()
                # Nothing of the worker's: not its pipes to the parent, not the slot lock.
                os.closerange(0, 2)
                os.closerange(3, keep)
                os.closerange(keep + 1, 1 << 16)
                self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != self._pid:
                    raise RuntimeError("the worker died while its zygote started")
                self._prctl(PR_SET_CHILD_SUBREAPER, 1)
                self._pid = os.getpid()
                self._serve_zygote(theirs)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        return pid, ours

    # -- the zygote ----------------------------------------------------------------------

    def _serve_zygote(self, sock) -> None:
        """Keep one confined program waiting for its job; reap it and report when it ends.

        For program ``k`` the zygote gives it a fresh tmpfs as ``/tmp``, forks it
        (it confines itself and then waits for its job on a pipe) and sends the
        worker the other ends of its pipes with ``k``. When the program ends, or
        on ``kill k`` from the worker (the deadline passed), it kills and reaps
        the program's whole tree and sends one report: ``k``, the exit code and
        the number of leftover processes reaped, or an error. A ``kill`` for a
        program already reported crossed its end and is ignored. Nothing else
        passes through this process: the job goes from the worker to the
        program directly.
        """
        import select
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        k = 0
        child, pidfd = self._prepare(sock, k)
        poller.register(pidfd, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            kill = False
            if pidfd not in ready:
                msg = sock.recv(64)
                if not msg:
                    self._reap_all(-1)
                    return
                if msg != b"kill %d" % k:
                    if msg.startswith(b"kill "):
                        continue  # crossed the end of an earlier program
                    raise RuntimeError(f"zygote protocol error: {msg[:32]!r}")
                kill = True
            self._report(sock, k, child, kill)
            poller.unregister(pidfd)
            os.close(pidfd)
            k += 1
            child, pidfd = self._prepare(sock, k)
            poller.register(pidfd, select.POLLIN)

    def _report(self, sock, k: int, child: int, kill: bool) -> None:
        """Kill (if asked) and reap program ``k`` and every descendant; tell the worker."""
        try:
            if kill:
                self._kill_tree(child)
            _, wstatus = os.waitpid(child, 0)
            reply = {"program": k, "exit_code": os.waitstatus_to_exitcode(wstatus),
                     "leftover_killed": self._reap_all(child)}
        except Exception as e:  # noqa: BLE001 - reported to the worker, which fails loudly
            reply = {"program": k, "error": _describe(e)}
        sock.send(json.dumps(reply).encode())

    def _prepare(self, sock, k: int) -> tuple[int, int]:
        """Fork program ``k`` with a fresh ``/tmp``; send the worker its pipes. Returns
        ``(pid, pidfd)``."""
        import socket
        if self.isolated:  # a fresh, empty tmpfs as the program's /tmp
            tmp = self.jail + "/tmp"
            if k:  # the previous program's, with no process left that could hold it
                self._call("umount2", tmp.encode(), 0)
            self._mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                        f"size={self.tmpfs_mb}m,mode=700,uid={self.uid},gid={self.gid}")
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # ---- the program: never returns
            try:
                sock.close()
                for fd in (job_w, res_r, out_r, ctl_r):
                    os.close(fd)
                self._program(job_r, res_w, out_w, ctl_w)
            finally:
                try:
                    sys.stdout.flush()
                except BaseException:  # noqa: BLE001 - the program may have replaced stdout
                    pass
                os._exit(0)
        for fd in (job_r, res_w, out_w, ctl_w):
            os.close(fd)
        ends = [job_w, res_r, out_r, ctl_r]
        socket.send_fds(sock, [b"program %d %d" % (k, pid)], ends)
        for fd in ends:
            os.close(fd)
        return pid, os.pidfd_open(pid)

    def _program(self, job_r: int, res_w: int, out_w: int, ctl_w: int) -> None:
        """Child side: confine this process, then wait for the job, then run it."""
        ctl = ctl_w
        try:
            ctl = self._confine(job_r, res_w, out_w, ctl_w)
            chunks = []
            while True:
                chunk = os.read(JOB_FD, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(JOB_FD)
            job = json.loads(b"".join(chunks))
            del chunks
            self._limit(job)
        except BaseException as e:  # noqa: BLE001 - reported on the control pipe
            os.write(ctl, b"\0" + _describe(e).encode())
            raise
        # Confinement is complete. Say so on the control pipe and close it, so the
        # program can neither forge nor suppress this signal.
        os.write(CONTROL_FD, b"\1")
        os.close(CONTROL_FD)
        run_harness(job["setup"], job["code"], job["calls"])

    def _confine(self, job_r: int, res_w: int, out_w: int, ctl_w: int) -> int:
        """Confine this process before it sees any job; returns ``CONTROL_FD``.

        Afterwards fd 0 is the read end of an empty pipe, fds 1 and 2 the output
        pipe, ``RESULT_FD`` the record pipe, ``CONTROL_FD`` the control pipe and
        ``JOB_FD`` the job pipe (closed once the job is read); nothing else is
        open. The process runs as the slot uid, in the jail, under the seccomp
        filter, with no way back to privileges.
        """
        import fcntl
        import resource
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if self.isolated:
            # A System V IPC namespace of its own: semaphores, message queues and shared
            # memory outlive their processes, but not their namespace, which dies with
            # the program.
            self._call("unshare", CLONE_NEWIPC)
            os.chroot(self.jail)
            os.chdir("/tmp")
        stdin_r, stdin_w = os.pipe()
        os.close(stdin_w)
        # Lift every descriptor clear of 0-5 before placing them: the zygote closed its own
        # 0 and 1, so the pipes may sit anywhere in that range.
        fds = (stdin_r, out_w, res_w, ctl_w, job_r)
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in fds]
        for fd, target in zip(moved, (0, 1, RESULT_FD, CONTROL_FD, JOB_FD)):
            os.dup2(fd, target)
        os.dup2(moved[1], 2)
        os.closerange(JOB_FD + 1, 1 << 16)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.isolated:
            resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
        self._prctl(PR_SET_NO_NEW_PRIVS, 1)
        if self.isolated:
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
        # After the uid change, which clears it: die with the zygote.
        self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self._pid:
            raise RuntimeError("the sandbox zygote died while a program was starting")
        if self.isolated:
            self._install_seccomp()
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: prints survive _exit
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.stdin = open(0, "r", closefd=False)
        import random
        random.seed()  # like a fresh interpreter: children do not share the zygote's stream
        return CONTROL_FD

    def _limit(self, job: dict) -> None:
        """The job's limits (lowering limits needs no privilege) and environment."""
        import resource
        cpu = int(math.ceil(float(job["timeout"]))) + 1
        limits = [(resource.RLIMIT_AS, int(job["memory_mb"]) << 20), (resource.RLIMIT_CPU, cpu),
                  (resource.RLIMIT_FSIZE, int(job.get("fsize_mb", 16)) << 20),
                  (resource.RLIMIT_NOFILE, 64)]
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        home = "/tmp" if self.isolated else job["workdir"]
        if not self.isolated:
            os.chdir(home)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home,
                           "LANG": "C.UTF-8"})

    # -- the worker: one program -----------------------------------------------------------

    def run(self, job: dict) -> tuple[dict, bytes, bytes]:
        timeout = float(job["timeout"])
        workdir = ""
        if not self.isolated:
            import tempfile
            workdir = tempfile.mkdtemp(prefix="run-", dir=self.jail)
            job = {**job, "workdir": workdir}
        job_w, res_r, out_r, ctl_r = self._waiting
        start = time.monotonic()
        try:
            write_all(job_w, json.dumps(job).encode())
        except BrokenPipeError:  # it died before reading: the control pipe says why
            pass
        os.close(job_w)
        header, records, output = self._supervise(res_r, out_r, start + timeout)
        self._next += 1
        self.waiting_pid, self._waiting = self._receive_program()
        header["waiting_pid"] = self.waiting_pid
        control = os.read(ctl_r, 4096)  # every writer is dead: returns at once
        if control.startswith(b"\0"):
            header["sandbox_error"] = control[1:].decode(errors="replace")
        elif not control and not header["timed_out"]:
            header["sandbox_error"] = "the child died before its sandbox was set up"
        for fd in (res_r, out_r, ctl_r):
            os.close(fd)
        header["wall_s"] = round(time.monotonic() - start, 6)
        if workdir:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
        return header, records, output

    def _receive_program(self) -> tuple[int, list[int]]:
        """The pid and pipe ends of the program the zygote has waiting for the next job."""
        import socket
        msg, fds, _, _ = socket.recv_fds(self._sock, 64, 4)
        words = msg.split()
        if len(words) != 3 or words[:2] != [b"program", b"%d" % self._next] or len(fds) != 4:
            raise RuntimeError(f"the zygote sent {msg[:32]!r} with {len(fds)} fds")
        return int(words[2]), fds

    def _supervise(self, res_r: int, out_r: int, deadline: float):
        """Collect output until the zygote reports the program over, or the deadline or a
        cap passes (then it has the zygote kill the tree); then drain the pipes."""
        import select
        records, output = bytearray(), bytearray()
        out_total = 0
        status = {"timed_out": False, "output_limited": False, "records_limited": False}
        poller = select.poll()
        zygote = self._sock.fileno()
        for fd in (res_r, out_r, zygote):
            poller.register(fd, select.POLLIN)
        open_fds = {res_r, out_r}
        over = False
        while not over:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status["timed_out"] = True
                break
            for fd, _ in poller.poll(max(1, int(remaining * 1000))):
                if fd == zygote:
                    over = True
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
        if not over:
            self._sock.send(b"kill %d" % self._next)
        reply = json.loads(self._sock.recv(4096) or b'{"error": "the zygote died"}')
        if "error" in reply or reply.get("program") != self._next:
            raise RuntimeError(f"could not stop a program: {reply}")
        del reply["program"]
        status.update(reply)
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

    # -- killing (zygote, and the worker before its zygote exists) -----------------------

    def _kill_tree(self, pid: int) -> None:
        """SIGKILL the program's whole tree, descendants that left its session included.

        Isolated: a helper that becomes the slot uid sends ``kill(-1, SIGKILL)``,
        which reaches every process of that uid at once. While it is that uid a
        program can stop it (``kill(-1, SIGSTOP)`` in a loop does), so a helper
        that has not finished within ``KILL_HELPER_S`` is killed and the uid's
        processes are killed one by one from here, as root, which no signal of
        theirs can stop.
        """
        if self.isolated:
            helper = os.fork()
            if helper == 0:
                try:
                    os.setresgid(self.gid, self.gid, self.gid)
                    os.setresuid(self.uid, self.uid, self.uid)
                    os.kill(-1, signal.SIGKILL)  # every process of the slot uid, except this one
                finally:
                    os._exit(0)
            import select
            pidfd = os.pidfd_open(helper)
            finished = select.select([pidfd], [], [], KILL_HELPER_S)[0]
            os.close(pidfd)
            if not finished:
                os.kill(helper, signal.SIGKILL)
                for stray in _processes_of_uid(self.uid):
                    try:
                        os.kill(stray, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
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

        The zygote is a subreaper, so it inherits every orphan of the program: an
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
        """Stop the zygote (it reaps what is left first) and remove an unisolated temp dir."""
        try:
            self._sock.close()
            os.waitpid(self._zygote_pid, 0)
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
                                     "waiting_pid": worker.waiting_pid,
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
