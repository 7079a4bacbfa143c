"""A seccomp-BPF allow-list for a running VMM: any other syscall kills the whole VMM (SIGSYS).

`install()` is the jail's last step (hypervisor/jail.py): after the KVM VM, its memory, devices, vCPUs and the
API socket exist, before the first KVM_RUN. It covers every thread of the process at once (TSYNC), and threads
started later inherit it. One filter for all threads, not Firecracker's one per thread: every thread here runs the
same interpreter, so a guest that takes over one thread can run code in any other; per-thread lists would add
nothing but ways to break.

What stays allowed is what a running VMM does (measured with strace in the lab, see tests/guest/test_seccomp.py):
KVM_RUN and the KVM ioctls a snapshot reads with, file I/O (virtio-blk, console log, snapshot files, lazy imports),
memory, threads, time, and the already-open Unix sockets. Argument checks where they are cheap and matter:
ioctl only with the listed request numbers, clone only for threads, tgkill only within this process, socket only
AF_UNIX. Gone: exec, fork, KVM_CREATE_VM/VCPU and memory slots, new network sockets, mount, ptrace, bpf, ...

The filter is built by libseccomp through its own Python bindings (Debian's python3-seccomp): ~1 ms to import
and nothing heavy on the VMM's start-up path, where the PyPI ctypes wrapper (pyseccomp) costs ~50 ms on the host
and pulls in subprocess, typing and re (tests/unit/test_seccomp.py keeps the measurement).
"""

from __future__ import annotations

import errno
import os
import sys

from hypervisor import kvm_structs as K

SYSTEM_DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's python3-seccomp, for a venv's interpreter
AF_UNIX = 1
CLONE_THREAD = 0x00010000
IOCTL_MASK = 0xFFFFFFFF  # the kernel reads an ioctl request as a 32-bit int: compare only those bits
DENIED_PROBE = "getsid"  # a syscall never on the list: the test hook's way to die of SIGSYS

# Syscalls allowed with any arguments, by what needs them.
ALLOWED = (
    # file I/O: virtio-blk (preadv/pwritev/fsync), console and VMM logs, snapshot files, agent/serial sinks
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "lseek", "close", "fsync", "fdatasync", "ftruncate", "fcntl", "dup", "dup3",
    # opening files: a disk swapped in (PUT /drives/rootfs), a snapshot written, modules imported lazily
    "openat", "newfstatat", "fstat", "statx", "getdents64", "readlink", "getcwd",
    "mkdir", "rename", "unlink",  # snapshot directory and its files; the API socket removed at exit
    # memory: allocator, mapped snapshot memory, C extensions loaded by a lazy import
    "brk", "mmap", "munmap", "mprotect", "madvise", "mremap",
    # threads (clone below), locks, signals (SIGUSR1 kicks a vCPU out of KVM_RUN)
    "futex", "set_robust_list", "rseq", "sched_yield", "sched_getaffinity", "gettid", "getpid", "getppid",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall", "exit", "exit_group",
    # time
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    # the API socket (bound before install): accept, talk, wait with a timeout
    "accept4", "accept", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername", "poll", "ppoll", "select", "pselect6",
    # virtio-rng, hash seeds
    "getrandom",
    # identity lookups that change nothing
    "getuid", "geteuid", "getgid", "getegid",
)

# ioctl requests: the run loop, and what PUT /snapshot reads (hypervisor/snapshot.py); no creation, no SET_*.
KVM_IOCTLS = (
    "KVM_RUN", "KVM_IRQ_LINE", "KVM_CHECK_EXTENSION", "KVM_GET_API_VERSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_INDEX_LIST",
    "KVM_GET_REGS", "KVM_GET_SREGS", "KVM_GET_FPU", "KVM_GET_XSAVE", "KVM_GET_XSAVE2", "KVM_GET_XCRS",
    "KVM_GET_LAPIC", "KVM_GET_MSRS", "KVM_GET_MP_STATE", "KVM_GET_VCPU_EVENTS", "KVM_GET_DEBUGREGS",
    "KVM_GET_CPUID2", "KVM_GET_IRQCHIP", "KVM_GET_PIT2", "KVM_GET_CLOCK",
)
# tty/socket ioctls Python makes on its own: isatty() when opening a file, setblocking(), set_inheritable()
OTHER_IOCTLS = {"TCGETS": 0x5401, "FIONBIO": 0x5421, "FIONCLEX": 0x5450, "FIOCLEX": 0x5451}


class SeccompUnavailable(OSError):
    """No filter could be installed; the message says what to install or change."""


def bindings():
    """libseccomp's Python module (`seccomp`), from this interpreter's path or Debian's dist-packages."""
    try:
        import seccomp
        return seccomp
    except ImportError:
        pass
    sys.path.append(SYSTEM_DIST_PACKAGES)  # only for this import: nothing else is looked up there
    try:
        import seccomp
        return seccomp
    except ImportError as exc:
        raise SeccompUnavailable(
            errno.ENOENT, f"no libseccomp Python bindings for Python {sys.version_info[0]}.{sys.version_info[1]} "
                          f"({exc}): install Debian's python3-seccomp (make deps)") from None
    finally:
        sys.path.remove(SYSTEM_DIST_PACKAGES)


def unavailable_reason() -> str | None:
    """None when install() can work here, else why not, in one line (for pclited's jail feature report)."""
    try:
        bindings()
    except SeccompUnavailable as exc:
        return str(exc.strerror or exc)
    try:
        with open("/proc/self/status", "rb") as f:
            if not any(line.startswith(b"Seccomp_filters:") or line.startswith(b"Seccomp:") for line in f):
                return "this kernel has no seccomp (CONFIG_SECCOMP_FILTER)"
    except OSError:
        pass
    return None


def ioctl_requests() -> dict[str, int]:
    found = {name: getattr(K, name) for name in KVM_IOCTLS}
    found.update(OTHER_IOCTLS)
    return found


def build(seccomp=None, default_action=None):
    """The filter (a libseccomp SyscallFilter), not loaded. default_action: seccomp.KILL_PROCESS unless given
    (seccomp.LOG to learn what a workload would need)."""
    seccomp = seccomp or bindings()
    Arg = seccomp.Arg
    f = seccomp.SyscallFilter(seccomp.KILL_PROCESS if default_action is None else default_action)
    f.set_attr(seccomp.Attr.CTL_TSYNC, 1)  # every thread of the process, atomically (or none: load() fails)
    for name in ALLOWED:
        f.add_rule(seccomp.ALLOW, name)
    for request in ioctl_requests().values():
        f.add_rule(seccomp.ALLOW, "ioctl", Arg(1, seccomp.MASKED_EQ, IOCTL_MASK, request))
    f.add_rule(seccomp.ALLOW, "clone", Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    # glibc starts threads with clone3, whose flags sit in memory a filter cannot read: "not implemented" makes it
    # fall back to clone, checked above.
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(seccomp.ALLOW, "tgkill", Arg(0, seccomp.EQ, os.getpid()))
    f.add_rule(seccomp.ALLOW, "socket", Arg(0, seccomp.EQ, AF_UNIX))
    return f


def install(default_action=None) -> None:
    """Load the allow-list on every thread of this process, for good. Raises SeccompUnavailable when it cannot."""
    try:
        build(default_action=default_action).load()
    except SeccompUnavailable:
        raise
    except OSError as exc:
        raise SeccompUnavailable(exc.errno or errno.EINVAL, f"seccomp filter not installed: {exc}") from None


def installed() -> bool:
    """Whether this process runs under a seccomp filter (/proc/self/status `Seccomp: 2`)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Seccomp:"):
                    return line.split()[1] == b"2"
    except OSError:
        pass
    return False


def make_denied_syscall() -> None:
    """The test hook (PCLITE_TEST_HOOKS=1): a syscall off the list, so a filtered VMM dies of SIGSYS here."""
    os.getsid(0)
