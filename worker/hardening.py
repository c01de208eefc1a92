"""Process hardening for the worker, with ctypes and the standard library only.

Everything here must run in the worker's main thread *before* any other thread
exists (before numpy, onnxruntime or zmq are imported): ``PR_SET_NO_NEW_PRIVS``,
seccomp filters and Landlock domains are per-thread and only threads created
afterwards inherit them. Each step is recorded in a :class:`Report` (returned
to callers by the worker's ``health`` op); a step the kernel does not offer is
reported ``absent``, never silently skipped.

Steps, in order (why each one):

- clean environment: a minimal ``os.environ`` with ``HOME``/``XDG_CACHE_HOME``
  pointing at a private empty directory, so onnxruntime's telemetry store
  (``~/.cache/Microsoft/...``, which names the model's graph) has nowhere to go;
- ``RLIMIT_CORE 0``: a crash must not dump plaintext weights to disk;
- optional drop to an unprivileged user (when started as root);
- ``PR_SET_DUMPABLE 0``: no ptrace and no ``/proc/PID/mem`` by the same user;
- ``PR_SET_NO_NEW_PRIVS``: no privilege gain through exec (and Landlock needs it);
- ``mlockall``: plaintext never reaches swap, where ``RLIMIT_MEMLOCK`` allows;
- Landlock: no file writes anywhere (a socket may be made in the endpoint dir),
  and no file reads beyond what the worker needs (:func:`startup_reads`: its
  Python path, system libraries, a few files in ``/proc``, ``/sys`` and
  ``/etc``, and the package, licence and key files it was given), so even an
  onnxruntime bug or a missed path in a model cannot read the operator's files;
- seccomp: ``ptrace``, ``process_vm_readv/writev`` and ``execve`` fail with EPERM.

Apart from these, :func:`limit_memory` lowers ``RLIMIT_DATA`` (a worker's
private memory) to what its package's declared plaintext needs, before the
payload is read (the daemon's value first thing, or the worker's own from the
header): a package that claims gigabytes costs a MemoryError, not the machine.

Example::

    report = harden(home="/tmp/vault-x/home", endpoint_dir="/tmp/vault-x")
    report.as_dict()["dumpable"]   # {"status": "on", "detail": "PR_SET_DUMPABLE=0"}
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Report", "harden", "read_back", "startup_reads", "verify"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
SECCOMP_MODE_FILTER = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1

# Per-architecture syscall numbers (only what the filters and Landlock need).
_ARCH: dict[str, dict[str, int]] = {
    "x86_64": {
        "audit": 0xC000003E, "seccomp": 317, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "execve": 59, "execveat": 322, "pidfd_getfd": 438,
    },
    "aarch64": {
        "audit": 0xC00000B7, "seccomp": 277, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "execve": 221, "execveat": 281, "pidfd_getfd": 438,
    },
}  # fmt: skip
_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446  # same on both
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "execve", "execveat",
)  # fmt: skip

# Landlock filesystem rights (include/uapi/linux/landlock.h).
LL_EXECUTE = 1 << 0
LL_WRITE_FILE = 1 << 1
LL_READ_FILE = 1 << 2
LL_READ_DIR = 1 << 3
LL_REMOVE_DIR = 1 << 4
LL_REMOVE_FILE = 1 << 5
LL_MAKE_ALL = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
LL_MAKE_SOCK = 1 << 9
LL_REFER = 1 << 13  # ABI 2
LL_TRUNCATE = 1 << 14  # ABI 3


@dataclass
class Report:
    """What each hardening step did: ``on``, ``off``, ``skipped``, ``absent`` or ``failed``."""

    steps: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self, name: str, status: str, detail: str = "") -> None:
        self.steps[name] = {"status": status, "detail": detail}

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {k: dict(v) for k, v in self.steps.items()}


def _errno_text() -> str:
    e = ctypes.get_errno()
    return f"errno {e} ({os.strerror(e)})"


def clean_environment(home: str, keep: dict[str, str] | None = None) -> None:
    """Replace ``os.environ`` with a minimal one whose HOME is ``home``."""
    os.environ.clear()
    os.environ.update(
        {
            "HOME": home,
            "XDG_CACHE_HOME": home,
            "XDG_CONFIG_HOME": home,
            "TMPDIR": home,  # nothing should write; if something tries, it hits Landlock
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
    )
    if keep:
        os.environ.update(keep)


def drop_user(user: str) -> str:
    """setgroups/setgid/setuid to ``user``; returns ``uid:gid``."""
    import pwd

    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() != pw.pw_uid or os.geteuid() != pw.pw_uid:  # pragma: no cover
        raise OSError("setuid did not take effect")
    return f"{pw.pw_uid}:{pw.pw_gid}"


def _mlock(report: Report) -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    privileged = os.geteuid() == 0
    # With MCL_FUTURE every later mapping counts against RLIMIT_MEMLOCK; under a
    # small limit the first big allocation (a weight tensor) would fail, so we
    # only lock when the limit cannot bite.
    if soft != resource.RLIM_INFINITY and not privileged:
        report.record(
            "mlock", "skipped", f"RLIMIT_MEMLOCK={soft} bytes is too small for MCL_FUTURE"
        )
        return
    # MCL_ONFAULT locks pages as they are touched instead of populating every
    # reserved mapping (thread stacks, allocator arenas) up front.
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        report.record("mlock", "on", "mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)")
    elif _libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        report.record("mlock", "on", "mlockall(MCL_CURRENT|MCL_FUTURE)")
    else:
        report.record("mlock", "failed", _errno_text())


# What a worker reads after hardening, besides its Python path and the files
# it was given: shared libraries, name resolution (a key server by host
# name), the time zone, CPU topology (onnxruntime sizes its thread pools from
# it), its own /proc entries and random numbers.
_SYSTEM_READS = (
    "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
    "/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
    "/etc/localtime", "/usr/share/zoneinfo", "/proc/self", "/proc/cpuinfo", "/proc/meminfo",
    "/proc/stat", "/sys/devices/system/cpu", "/sys/fs/cgroup", "/dev/urandom", "/dev/random",
    "/dev/null", "/dev/zero",
)  # fmt: skip


def startup_reads(files: list[str | None]) -> list[str]:
    """Everything a worker may read once hardened: the Python path (imports
    happen after hardening), the interpreter's own prefix, system files
    (``_SYSTEM_READS``) and ``files`` (package, licence, keys). Not the
    working directory, not the home directory."""
    import importlib.util
    import sys

    paths = [p for p in sys.path if p and os.path.isabs(p)]
    # the packages themselves: an editable install maps them from elsewhere
    for pkg in ("worker", "vault"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            paths += [str(p) for p in spec.submodule_search_locations]
    paths += [os.path.join(sys.base_prefix, "lib"), os.path.join(sys.prefix, "lib")]
    paths += list(_SYSTEM_READS)
    paths += [os.path.abspath(f) for f in files if f]
    return list(dict.fromkeys(paths))


def _allow_reads(fd: int, paths: list[str]) -> int:
    """Add a read rule per existing path; returns how many were added."""
    added = 0
    for path in paths:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # absent here: nothing to allow
        try:
            is_dir = os.path.isdir(f"/proc/self/fd/{pfd}")
            rights = LL_READ_FILE | (LL_READ_DIR if is_dir else 0)
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, pfd))
            if _libc.syscall(_LANDLOCK_ADD_RULE, fd, 1, rule, 0) != 0:
                raise OSError(ctypes.get_errno(), f"landlock add_rule for {path}")
            added += 1
        finally:
            os.close(pfd)
    return added


def _landlock(report: Report, endpoint_dir: str | None, reads: list[str] | None = None) -> None:
    abi = _libc.syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 0:
        report.record("landlock", "absent", f"kernel has no Landlock: {_errno_text()}")
        return
    handled = LL_EXECUTE | LL_WRITE_FILE | LL_REMOVE_DIR | LL_REMOVE_FILE | LL_MAKE_ALL
    if reads is not None:
        handled |= LL_READ_FILE | LL_READ_DIR
    if abi >= 2:
        handled |= LL_REFER
    if abi >= 3:
        handled |= LL_TRUNCATE
    attr = ctypes.create_string_buffer(struct.pack("=Q", handled))
    fd = _libc.syscall(_LANDLOCK_CREATE, attr, ctypes.c_size_t(8), ctypes.c_uint32(0))
    if fd < 0:
        report.record("landlock", "failed", f"create_ruleset: {_errno_text()}")
        return
    try:
        detail = f"ABI {abi}: no file writes, no exec"
        if endpoint_dir:
            # The ipc:// endpoint is a socket file: allow making (and, at close,
            # removing) sockets beneath its private directory and nothing else.
            dfd = os.open(endpoint_dir, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(
                    struct.pack("=Qi", LL_MAKE_SOCK | LL_REMOVE_FILE, dfd)
                )
                if _libc.syscall(_LANDLOCK_ADD_RULE, fd, 1, rule, 0) != 0:
                    report.record("landlock", "failed", f"add_rule: {_errno_text()}")
                    return
            finally:
                os.close(dfd)
            detail += "; sockets only in the endpoint directory"
        if reads is not None:
            try:
                n = _allow_reads(fd, reads)
            except OSError as exc:
                report.record("landlock", "failed", str(exc))
                return
            detail += f"; reads only beneath {n} start-up paths"
        if _libc.syscall(_LANDLOCK_RESTRICT, fd, 0) != 0:
            report.record("landlock", "failed", f"restrict_self: {_errno_text()}")
            return
        report.record("landlock", "on", detail)
    finally:
        os.close(fd)


def _seccomp_program(arch: dict[str, int]) -> list[tuple[int, int, int, int]]:
    """A classic-BPF program: wrong arch -> allow (filters are per-ABI), the
    x32 ABI -> EPERM, each denied syscall -> EPERM, everything else allowed."""
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    deny = SECCOMP_RET_ERRNO | EPERM
    nrs = [arch[n] for n in _DENIED_SYSCALLS]
    body: list[tuple[int, int, int, int]] = []
    body.append((ld_abs, 0, 0, 4))  # seccomp_data.arch
    # instructions after this one: ld nr, jge x32, len(nrs) jeqs, ret allow, ret deny
    n_after = 1 + 1 + len(nrs) + 2
    body.append((jeq, 0, n_after - 2, arch["audit"]))  # mismatch -> ret allow
    body.append((ld_abs, 0, 0, 0))  # seccomp_data.nr
    remaining = len(nrs) + 1  # instructions between this jge and "ret deny"
    body.append((jge, remaining, 0, 0x40000000))
    for i, nr in enumerate(nrs):
        body.append((jeq, len(nrs) - i, 0, nr))  # -> ret deny
    body.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    body.append((ret, 0, 0, deny))
    return body


def _seccomp(report: Report) -> None:
    arch = _ARCH.get(platform.machine())
    if arch is None:
        report.record("seccomp", "absent", f"no filter for {platform.machine()}")
        return
    prog = _seccomp_program(arch)
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    filt = ctypes.create_string_buffer(raw)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(filt))
    rc = _libc.syscall(
        arch["seccomp"],
        ctypes.c_uint(1),
        ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(fprog),
    )
    if rc != 0 and ctypes.get_errno() in (38,):  # ENOSYS: old kernel, per-thread prctl
        rc = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)
    if rc != 0:
        e = ctypes.get_errno()
        status = "absent" if e in (22, 38) else "failed"
        report.record("seccomp", status, _errno_text())
        return
    report.record("seccomp", "on", "EPERM for " + ", ".join(_DENIED_SYSCALLS))


def _kernel_status() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


_startup_memory_limit: int | None = None  # what limit_memory set, as health reports it


def limit_memory(limit: int) -> None:
    """Lower the soft ``RLIMIT_DATA`` to ``limit`` bytes (never raise it): what
    the worker's private memory (heap, anonymous mappings, thread stacks) may
    reach while it starts. A start-up that would pass it (a package whose
    claims take more than it declares) gets a MemoryError, reported as a failed
    start, instead of the machine's memory. The hard limit is left as it is, so
    that :func:`lift_memory_limit` can give a started worker its compute
    memory back."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError("memory_limit must be a positive number of bytes")
    global _startup_memory_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    new = min([limit, *(x for x in (soft, hard) if x != resource.RLIM_INFINITY)])
    resource.setrlimit(resource.RLIMIT_DATA, (new, hard))
    _startup_memory_limit = new


def lift_memory_limit() -> None:
    """After the sessions are built from a package whose signature held: the
    soft ``RLIMIT_DATA`` back to the hard limit (what the worker was started
    with). The start-up limit is there for what a package *claims*; the
    publisher's own model then computes with the memory plain onnxruntime would
    have (requests are bounded by the channel's message limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))


def read_back(report: Report) -> None:
    """Replace what each step *meant* to set with what the kernel says is set:
    ``PR_GET_DUMPABLE``, ``/proc/self/status`` (``NoNewPrivs``, ``Seccomp``),
    ``RLIMIT_CORE``. A step that reported ``on`` but is not in force becomes
    ``failed``; one that is in force whatever was asked reads ``on``."""
    status = _kernel_status()
    dumpable = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    facts = {
        "dumpable": (dumpable == 0, f"PR_GET_DUMPABLE={dumpable}"),
        "no_new_privs": (
            status.get("NoNewPrivs") == "1",
            f"NoNewPrivs: {status.get('NoNewPrivs', '?')}",
        ),
        "seccomp": (status.get("Seccomp") == "2", f"Seccomp: {status.get('Seccomp', '?')}"),
        "core_dumps": (core == (0, 0), f"RLIMIT_CORE={core[0]}"),
    }
    for name, (in_force, seen) in facts.items():
        old = report.steps.get(name, {"status": "off", "detail": ""})
        if in_force:
            new = "on"
        elif old["status"] in ("off", "absent", "skipped"):
            new = old["status"]
        else:
            new = "failed"
        detail = f"{old['detail']}; kernel: {seen}" if old["detail"] else f"kernel: {seen}"
        report.record(name, new, detail)


def harden(
    *,
    home: str | None,
    endpoint_dir: str | None = None,
    user: str | None = None,
    mlock: bool = True,
    landlock: bool = True,
    seccomp: bool = True,
    keep_env: dict[str, str] | None = None,
    reads: list[str] | None = None,
) -> Report:
    """Apply every step in order and return what happened. ``reads`` (see
    :func:`startup_reads`) limits file reads too; None leaves reads open."""
    report = Report()
    if home is not None:
        clean_environment(home, keep_env)
        report.record("environment", "on", "minimal environment; HOME is private and empty")
    else:
        report.record("environment", "off", "environment inherited")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        report.record("core_dumps", "on", "RLIMIT_CORE=0")
    except (OSError, ValueError) as exc:
        report.record("core_dumps", "failed", str(exc))
    if user:
        if os.geteuid() != 0:
            report.record("user", "skipped", f"not root; running as uid {os.getuid()}")
        else:
            report.record("user", "on", drop_user(user))  # a failure here is fatal
    else:
        report.record("user", "off", f"uid {os.getuid()}")
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
        report.record("dumpable", "on", "PR_SET_DUMPABLE=0")
    else:
        report.record("dumpable", "failed", _errno_text())
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        report.record("no_new_privs", "on", "PR_SET_NO_NEW_PRIVS=1")
    else:
        report.record("no_new_privs", "failed", _errno_text())
    if mlock:
        _mlock(report)
    else:
        report.record("mlock", "off", "disabled by option")
    if landlock:
        _landlock(report, endpoint_dir, reads)
    else:
        report.record("landlock", "off", "disabled by option")
    if seccomp:
        _seccomp(report)
    else:
        report.record("seccomp", "off", "disabled by option")
    read_back(report)
    return report


def verify() -> dict[str, Any]:
    """Read the live state back from the kernel (what ``health`` shows)."""
    status: dict[str, str] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("Seccomp", "NoNewPrivs", "VmLck", "Uid"):
                    status[key] = value.strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return {
        "dumpable": _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
        "no_new_privs": _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        "rlimit_core": list(resource.getrlimit(resource.RLIMIT_CORE)),
        # -1: unlimited (a CUDA worker); else the bytes of private memory allowed
        "rlimit_data": list(resource.getrlimit(resource.RLIMIT_DATA)),
        # the soft RLIMIT_DATA the worker started under (None: not limited, a CUDA worker)
        "startup_memory_limit": _startup_memory_limit,
        "seccomp_mode": status.get("Seccomp"),
        "locked_memory": status.get("VmLck"),
        "uid": os.getuid(),
        "home": os.environ.get("HOME"),
        "environment": sorted(os.environ),
    }
