"""Thin, allocation-free-on-the-hot-path ctypes bindings for the generic x86_64 KVM API.

Object model (each owns exactly one fd; all are context managers and close idempotently)::

    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, len(mem), buffer_address(mem))
        vm.create_irqchip(); vm.create_pit2()
        vcpu = vm.create_vcpu(0)
        while True:
            reason = vcpu.run()              # KVM_EXIT_* int
            if reason == KVM_EXIT_IO:
                io = vcpu.io                 # cached view of kvm_run.io (no allocation)
                data = vcpu.io_data()        # memoryview into the shared kvm_run mmap

Every failing ioctl raises :class:`KvmError` naming the ioctl, the errno and what to check.
Only the generic KVM ABI is used (no vendor or PVM specifics).
"""

from __future__ import annotations

import _signal  # not `signal`: that imports enum, ~0.1 s of VMM start-up in the lab; only ints are needed here
import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable, Mapping

from hypervisor.kvm_structs import (
    IOCTL_NAMES,
    KVM_API_VERSION,
    KVM_CAP_XSAVE2,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_INTR,
    KVM_GET_API_VERSION,
    KVM_GET_CLOCK,
    KVM_GET_CPUID2,
    KVM_GET_DEBUGREGS,
    KVM_GET_FPU,
    KVM_GET_IRQCHIP,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_MSRS,
    KVM_GET_PIT2,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_XCRS,
    KVM_GET_XSAVE,
    KVM_GET_XSAVE2,
    KVM_IOEVENTFD,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQ_LINE,
    KVM_IRQFD,
    KVM_MAX_CPUID_ENTRIES,
    KVM_RUN,
    KVM_SET_CLOCK,
    KVM_SET_CPUID2,
    KVM_SET_DEBUGREGS,
    KVM_SET_FPU,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_IRQCHIP,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_PIT2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_VCPU_EVENTS,
    KVM_SET_XCRS,
    KVM_SET_XSAVE,
    XSAVE_LEGACY_SIZE,
    CpuidEntry,
    kvm_fpu,
    kvm_ioeventfd,
    kvm_irq_level,
    kvm_irqfd,
    kvm_lapic_state,
    kvm_pit_config,
    kvm_regs,
    kvm_run,
    kvm_run_mmio,
    kvm_sregs,
    kvm_userspace_memory_region,
    make_kvm_cpuid2,
    make_kvm_msr_list,
    make_kvm_msrs,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from hypervisor.kvm_snapshot_structs import (
        kvm_clock_data,
        kvm_debugregs,
        kvm_irqchip,
        kvm_pit_state2,
        kvm_vcpu_events,
        kvm_xcrs,
    )

KVM_DEVICE = "/dev/kvm"

# --------------------------------------------------------------------------- errors

_LAB_HINT = "or run in the lab VM via `pclite-lab run`"
_PERM_HINT = f"no permission on {KVM_DEVICE}: add the user to group kvm (and re-login) or fix its mode/ACL"

# (operation, errno) -> what to check.  Operation is an ioctl name or "open".
_HINTS: dict[tuple[str, int], str] = {
    ("open", errno.ENOENT): f"no {KVM_DEVICE}: load kvm_intel or kvm_amd (modprobe), {_LAB_HINT}",
    ("open", errno.ENXIO): f"kvm module loaded but no usable VT-x/AMD-V (disabled or not exposed); {_LAB_HINT}",
    ("open", errno.ENODEV): f"kvm module loaded but no usable VT-x/AMD-V (disabled or not exposed); {_LAB_HINT}",
    ("open", errno.EACCES): _PERM_HINT,
    ("open", errno.EPERM): _PERM_HINT,
    ("KVM_CREATE_VM", errno.EBUSY): "virtualization extensions are owned by another hypervisor (VirtualBox/VMware?)",
    ("KVM_CREATE_VM", errno.EINVAL): "unsupported machine type; pass 0 on x86",
    ("KVM_CREATE_VM", errno.ENOMEM): "out of memory (or too many VMs); check dmesg",
    ("KVM_CREATE_IRQCHIP", errno.EEXIST): "the in-kernel irqchip already exists: create_irqchip() was called twice",
    ("KVM_CREATE_IRQCHIP", errno.EINVAL): "create_irqchip() must be called before any vCPU is created",
    ("KVM_CREATE_PIT2", errno.EEXIST): "the in-kernel PIT already exists: create_pit2() was called twice",
    ("KVM_CREATE_PIT2", errno.ENOENT): "call create_irqchip() before create_pit2()",
    ("KVM_CREATE_VCPU", errno.EEXIST): "a vCPU with this index already exists in this VM",
    ("KVM_CREATE_VCPU", errno.EINVAL): "vCPU index out of range (see KVM_CAP_MAX_VCPU_ID / KVM_CAP_MAX_VCPUS)",
    ("KVM_SET_USER_MEMORY_REGION", errno.EINVAL): (
        "guest_phys_addr, memory_size and userspace_addr must be 4 KiB aligned, the slot below the slot limit "
        "and flags valid"
    ),
    ("KVM_SET_USER_MEMORY_REGION", errno.EEXIST): "the region overlaps another memory slot",
    ("KVM_SET_USER_MEMORY_REGION", errno.EFAULT): "userspace_addr is not a mapped, accessible range of this process",
    ("KVM_SET_CPUID2", errno.E2BIG): f"too many CPUID entries (KVM accepts at most {KVM_MAX_CPUID_ENTRIES})",
    ("KVM_SET_CPUID2", errno.EINVAL): "invalid CPUID (e.g. XSAVE sizes or MAXPHYADDR KVM cannot honour)",
    ("KVM_SET_CPUID2", errno.EBUSY): "CPUID cannot change after the vCPU has run",
    ("KVM_GET_SUPPORTED_CPUID", errno.E2BIG): "buffer too small for the supported CPUID entries",
    ("KVM_SET_SREGS", errno.EINVAL): "invalid control register/EFER/segment combination",
    ("KVM_RUN", errno.ENOEXEC): "the vCPU state cannot be entered (invalid sregs/segments?)",
    ("KVM_RUN", errno.EFAULT): "guest memory backing is not accessible (unmapped userspace_addr?)",
    ("KVM_RUN", errno.EINVAL): "invalid vCPU state or run configuration",
    ("KVM_IRQFD", errno.EEXIST): "this eventfd is already bound to a GSI",
    ("KVM_IRQFD", errno.EINVAL): "create_irqchip() first; gsi must be a routed GSI; flags valid",
    ("KVM_IOEVENTFD", errno.EEXIST): "an ioeventfd with this address/length/datamatch already exists",
    ("KVM_IOEVENTFD", errno.EINVAL): "length must be 0, 1, 2, 4 or 8 and the address valid",
    ("KVM_IOEVENTFD", errno.ENOSPC): "too many ioeventfds on this bus",
    ("KVM_IRQ_LINE", errno.ENXIO): "no in-kernel irqchip: call create_irqchip() first",
    ("KVM_GET_IRQCHIP", errno.ENXIO): "no in-kernel irqchip: call create_irqchip() first",
    ("KVM_SET_IRQCHIP", errno.ENXIO): "no in-kernel irqchip: call create_irqchip() first",
    ("KVM_GET_IRQCHIP", errno.EINVAL): "chip_id must be 0 (PIC master), 1 (PIC slave) or 2 (IOAPIC)",
    ("KVM_SET_IRQCHIP", errno.EINVAL): "chip_id must be 0 (PIC master), 1 (PIC slave) or 2 (IOAPIC)",
    ("KVM_GET_PIT2", errno.ENXIO): "no in-kernel PIT: call create_pit2() first",
    ("KVM_SET_PIT2", errno.ENXIO): "no in-kernel PIT: call create_pit2() first",
    ("KVM_GET_LAPIC", errno.ENXIO): "no in-kernel LAPIC: call create_irqchip() before creating vCPUs",
    ("KVM_SET_LAPIC", errno.ENXIO): "no in-kernel LAPIC: call create_irqchip() before creating vCPUs",
    ("KVM_SET_XCRS", errno.EINVAL): "XCR0 value not supported by the guest CPUID (set_cpuid2 first?)",
    ("KVM_SET_XSAVE", errno.EINVAL): "XSAVE features not enabled in the guest CPUID (set_cpuid2 first?)",
}
_GENERIC_HINTS: dict[int, str] = {
    errno.EBADF: "the fd is closed: the Kvm/Vm/Vcpu object was used after close()",
    errno.ENOTTY: "ioctl not supported by this KVM (check check_extension() for the matching capability)",
    errno.EFAULT: "KVM could not access the argument buffer",
    errno.ENOMEM: "out of memory; check dmesg",
    errno.EPERM: "operation not permitted (capability or seccomp?)",
    errno.EACCES: "permission denied",
    errno.EINVAL: "invalid argument for this ioctl",
    errno.ENXIO: "the required in-kernel device does not exist",
}


class KvmError(OSError):
    """A failing KVM operation; ``str()`` names the ioctl, errno name and what to check."""

    def __init__(self, err: int, message: str, ioctl: str | None = None):
        super().__init__(err, message)
        self.ioctl = ioctl

    @classmethod
    def from_errno(cls, op: str, err: int, detail: str = "") -> KvmError:
        name = errno.errorcode.get(err, f"errno {err}")
        hint = _HINTS.get((op, err)) or _GENERIC_HINTS.get(err, "")
        what = f"{op} failed" if op != "open" else f"open({KVM_DEVICE}) failed"
        msg = f"{what}{f' ({detail})' if detail else ''}: {name} ({os.strerror(err)})"
        return cls(err, f"{msg} - {hint}" if hint else msg, op)


def _ioctl_name(req: int) -> str:
    return IOCTL_NAMES.get(req, f"ioctl 0x{req:x}")


def _ioctl(fd: int, req: int, arg=0, detail: str = "") -> int:
    """ioctl(2) with KvmError on failure; retries EINTR (never used for KVM_RUN)."""
    while True:
        try:
            return fcntl.ioctl(fd, req, arg, True) if not isinstance(arg, int) else fcntl.ioctl(fd, req, arg)
        except InterruptedError:
            continue
        except OverflowError:
            return _ioctl_ulong(fd, req, arg, detail)
        except ValueError:  # fcntl rejects fd -1 before the syscall: the object was closed
            if fd >= 0:
                raise
            raise KvmError.from_errno(_ioctl_name(req), errno.EBADF, detail) from None
        except OSError as e:
            raise KvmError.from_errno(_ioctl_name(req), e.errno, detail) from None


_libc = ctypes.CDLL(None, use_errno=True)


def _ioctl_ulong(fd: int, req: int, value: int, detail: str = "") -> int:
    """ioctl(2) whose argument is an unsigned long (fcntl.ioctl only passes a C int)."""
    while True:
        ret = _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(req), ctypes.c_ulong(value))
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise KvmError.from_errno(_ioctl_name(req), err, detail)


def buffer_address(buf) -> int:
    """Host virtual address of a writable buffer (mmap, bytearray) for KVM_SET_USER_MEMORY_REGION.

    The address stays valid only as long as ``buf`` is alive and not resized/closed.
    """
    probe = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


class _FdOwner:
    """Owns one fd: ``close()`` is idempotent; the fd is closed too if the owner is forgotten unclosed."""

    __slots__ = ("fd", "__weakref__")

    def _own(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        # __del__ rather than weakref.finalize: the weakref module alone is ~8 ms of VMM start-up in the lab.
        fd = getattr(self, "fd", -1)  # unset if __init__ failed before _own
        if fd >= 0:
            try:  # noqa: SIM105 - no contextlib on the start-up path
                os.close(fd)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def fileno(self) -> int:
        return self.fd

    def ioctl(self, request: int, arg=0) -> int:
        """Raw escape hatch for ioctls without a wrapper; ``arg`` is an int or a ctypes struct/buffer."""
        return _ioctl(self.fd, request, arg)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- /dev/kvm


class Kvm(_FdOwner):
    """The /dev/kvm system fd."""

    __slots__ = ("path",)

    def __init__(self, path: str = KVM_DEVICE):
        self.path = path
        self.fd = -1
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError.from_errno("open", e.errno, path) from None
        self._own(fd)
        version = self.api_version()
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError(
                errno.EPROTO,
                f"KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}: incompatible kernel KVM",
                "KVM_GET_API_VERSION",
            )

    def api_version(self) -> int:
        return _ioctl(self.fd, KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if unsupported, else 1 or a cap-specific value."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, f"cap {cap}")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0)

    def supported_cpuid(self, max_entries: int = KVM_MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID as plain :class:`CpuidEntry` objects (grows the buffer on E2BIG)."""
        n = max_entries
        while True:
            buf = make_kvm_cpuid2(n)
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 8192:
                    n *= 2
                    continue
                raise
            return [CpuidEntry.from_struct(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM saves/restores for a vCPU."""
        probe = make_kvm_msr_list(0)
        try:
            _ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        lst = make_kvm_msr_list(probe.nmsrs)
        _ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, lst)
        return list(lst.indices[: lst.nmsrs])

    def create_vm(self, machine_type: int = 0) -> Vm:
        fd = _ioctl(self.fd, KVM_CREATE_VM, machine_type)
        return Vm(self, fd)


# --------------------------------------------------------------------------- VM


class Vm(_FdOwner):
    """A VM fd. ``close()`` also closes every vCPU created from it."""

    __slots__ = ("kvm", "vcpus", "_mmap_size", "_xsave_size", "_irq_level")

    def __init__(self, kvm: Kvm, fd: int):
        self._own(fd)
        self.kvm = kvm
        self.vcpus: list[Vcpu] = []
        self._mmap_size = kvm.vcpu_mmap_size()
        self._xsave_size: int | None = None
        self._irq_level = kvm_irq_level()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (VM-specific answer); falls back to /dev/kvm on old kernels."""
        try:
            return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, f"cap {cap}")
        except KvmError as e:
            if e.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
            return self.kvm.check_extension(cap)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        detail = f"slot {slot}, gpa 0x{guest_phys_addr:x}, size 0x{memory_size:x}, hva 0x{userspace_addr:x}"
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, detail)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl_ulong(self.fd, KVM_SET_TSS_ADDR, addr, f"0x{addr:x}")

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, struct.pack("=Q", addr), f"0x{addr:x}")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, KVM_CREATE_PIT2, kvm_pit_config(flags))

    def irq_line(self, irq: int, level: int) -> None:
        lv = self._irq_level
        lv.irq = irq
        lv.level = level
        _ioctl(self.fd, KVM_IRQ_LINE, lv)

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        _ioctl(self.fd, KVM_IRQFD, kvm_irqfd(fd, gsi, flags, resamplefd), f"fd {fd}, gsi {gsi}")

    def ioeventfd(
        self, addr: int, length: int, fd: int, datamatch: int | None = None, pio: bool = False, deassign: bool = False
    ) -> None:
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        ev = kvm_ioeventfd(datamatch or 0, addr, length, fd, flags)
        _ioctl(self.fd, KVM_IOEVENTFD, ev, f"{'pio' if pio else 'mmio'} 0x{addr:x}/{length}, fd {fd}")

    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        from hypervisor.kvm_snapshot_structs import kvm_irqchip
        chip = kvm_irqchip()
        chip.chip_id = chip_id
        _ioctl(self.fd, KVM_GET_IRQCHIP, chip, f"chip {chip_id}")
        return chip

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        _ioctl(self.fd, KVM_SET_IRQCHIP, chip, f"chip {chip.chip_id}")

    def get_pit2(self) -> kvm_pit_state2:
        from hypervisor.kvm_snapshot_structs import kvm_pit_state2
        state = kvm_pit_state2()
        _ioctl(self.fd, KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: kvm_pit_state2) -> None:
        _ioctl(self.fd, KVM_SET_PIT2, state)

    def get_clock(self) -> kvm_clock_data:
        from hypervisor.kvm_snapshot_structs import kvm_clock_data
        data = kvm_clock_data()
        _ioctl(self.fd, KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: kvm_clock_data | int) -> None:
        """Set kvmclock; an int sets ``clock`` (ns) with no flags."""
        if isinstance(data, int):
            from hypervisor.kvm_snapshot_structs import kvm_clock_data
            data = kvm_clock_data(clock=data)
        _ioctl(self.fd, KVM_SET_CLOCK, data)

    def xsave_size(self) -> int:
        """Bytes of the vCPU XSAVE buffer: KVM_CAP_XSAVE2's size if available, else 4096."""
        if self._xsave_size is None:
            self._xsave_size = max(self.check_extension(KVM_CAP_XSAVE2), 0)
        return self._xsave_size or XSAVE_LEGACY_SIZE

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, index, f"vcpu {index}")
        try:
            vcpu = Vcpu(self, index, fd, self._mmap_size, self.xsave_size(), self._xsave_size > 0)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        super().close()


# --------------------------------------------------------------------------- vCPU


class Vcpu(_FdOwner):
    """A vCPU fd plus its mmapped ``struct kvm_run`` (``run_struct``).

    ``io``, ``mmio``, ``system_event``, ``internal`` and ``fail_entry`` are cached ctypes views of the exit
    union living in the shared mapping, so reading an exit allocates nothing.
    """

    __slots__ = (
        "vm",
        "index",
        "run_struct",
        "io",
        "mmio",
        "system_event",
        "internal",
        "fail_entry",
        "_mmap",
        "_mv",
        "_mmio_data",
        "_xsave_size",
        "_xsave2",
    )

    def __init__(self, vm: Vm, index: int, fd: int, mmap_size: int, xsave_size: int, xsave2: bool):
        self.vm = vm
        self.index = index
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._own(fd)
        run = self.run_struct = kvm_run.from_buffer(self._mmap)
        self.io = run.io
        self.mmio = run.mmio
        self.system_event = run.system_event
        self.internal = run.internal
        self.fail_entry = run.fail_entry
        self._mv = memoryview(self._mmap)
        off = kvm_run._exit.offset + kvm_run_mmio.data.offset
        self._mmio_data = self._mv[off : off + 8]
        self._xsave_size = xsave_size
        self._xsave2 = xsave2

    # ---- hot path

    def run(self, _ioctl=fcntl.ioctl, _req=KVM_RUN, _intr=KVM_EXIT_INTR) -> int:
        """KVM_RUN; returns the exit reason. EINTR (signal or ``immediate_exit``) returns KVM_EXIT_INTR."""
        try:
            _ioctl(self.fd, _req, 0)
        except (InterruptedError, BlockingIOError):  # EAGAIN: an AP woken from wait-for-SIPI; run again
            return _intr
        except OSError as e:
            raise KvmError.from_errno("KVM_RUN", e.errno, f"vcpu {self.index}") from None
        except ValueError:  # fd -1: closed
            raise KvmError.from_errno("KVM_RUN", errno.EBADF, f"vcpu {self.index}") from None
        return self.run_struct.exit_reason

    def io_data(self) -> memoryview:
        """The KVM_EXIT_IO data area (``size * count`` bytes at ``data_offset`` in the kvm_run mmap)."""
        io = self.io
        off = io.data_offset
        return self._mv[off : off + io.size * io.count]

    def mmio_data(self) -> memoryview:
        """The KVM_EXIT_MMIO ``data`` bytes (``len`` of them); write into it to answer an MMIO read."""
        return self._mmio_data[: self.mmio.len]

    @property
    def immediate_exit(self) -> int:
        return self.run_struct.immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value: int) -> None:
        """Non-zero makes the next/current KVM_RUN return KVM_EXIT_INTR; the caller resets it to 0 to resume."""
        self.run_struct.immediate_exit = value

    def request_exit(self, thread_ident: int | None = None, signum: int = _signal.SIGUSR1) -> None:
        """Pause from another thread: set ``immediate_exit`` and, if given, signal the thread inside KVM_RUN.

        ``signum`` must have a Python handler installed (``signal.signal(signum, lambda *a: None)``) or it will
        kill the process.
        """
        self.run_struct.immediate_exit = 1
        if thread_ident is not None:
            _signal.pthread_kill(thread_ident, signum)

    # ---- register state

    def get_regs(self) -> kvm_regs:
        regs = kvm_regs()
        _ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs()
        _ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        fpu = kvm_fpu()
        _ioctl(self.fd, KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: kvm_fpu) -> None:
        _ioctl(self.fd, KVM_SET_FPU, fpu)

    def set_cpuid2(self, entries: Iterable) -> None:
        """KVM_SET_CPUID2 from objects with function/index/flags/eax/ebx/ecx/edx (CpuidEntry or ctypes)."""
        entries = list(entries)
        buf = make_kvm_cpuid2(len(entries))
        for dst, src in zip(buf.entries, entries, strict=True):
            dst.function, dst.index, dst.flags = src.function, src.index, src.flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = src.eax, src.ebx, src.ecx, src.edx
        _ioctl(self.fd, KVM_SET_CPUID2, buf, f"{len(entries)} entries")

    def get_cpuid2(self, max_entries: int = KVM_MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        buf = make_kvm_cpuid2(max_entries)
        _ioctl(self.fd, KVM_GET_CPUID2, buf)
        return [CpuidEntry.from_struct(buf.entries[i]) for i in range(buf.nent)]

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        buf = make_kvm_msrs(len(indices))
        for entry, index in zip(buf.entries, indices, strict=True):
            entry.index = index
        done = _ioctl(self.fd, KVM_GET_MSRS, buf)
        if done != len(indices):
            raise _msr_error("KVM_GET_MSRS", indices, done)
        return {e.index: e.data for e in buf.entries}

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        buf = make_kvm_msrs(len(msrs))
        for entry, (index, value) in zip(buf.entries, msrs.items(), strict=True):
            entry.index = index
            entry.data = value
        done = _ioctl(self.fd, KVM_SET_MSRS, buf)
        if done != len(msrs):
            raise _msr_error("KVM_SET_MSRS", list(msrs), done)

    def get_lapic(self) -> kvm_lapic_state:
        lapic = kvm_lapic_state()
        _ioctl(self.fd, KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: kvm_lapic_state) -> None:
        _ioctl(self.fd, KVM_SET_LAPIC, lapic)

    def get_xcrs(self) -> kvm_xcrs:
        from hypervisor.kvm_snapshot_structs import kvm_xcrs
        xcrs = kvm_xcrs()
        _ioctl(self.fd, KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: kvm_xcrs) -> None:
        _ioctl(self.fd, KVM_SET_XCRS, xcrs)

    @property
    def xsave_size(self) -> int:
        return self._xsave_size

    def get_xsave(self) -> bytearray:
        """The XSAVE area as ``xsave_size`` raw bytes (KVM_GET_XSAVE2 when KVM_CAP_XSAVE2 is available)."""
        buf = bytearray(self._xsave_size)
        _ioctl(self.fd, KVM_GET_XSAVE2 if self._xsave2 else KVM_GET_XSAVE, buf)
        return buf

    def set_xsave(self, data) -> None:
        """KVM_SET_XSAVE from bytes/bytearray/kvm_xsave; shorter input is zero-padded to ``xsave_size``."""
        raw = bytes(data)
        if len(raw) > self._xsave_size:
            raise ValueError(f"xsave data is {len(raw)} bytes, this vCPU's XSAVE area is {self._xsave_size}")
        buf = bytearray(self._xsave_size)
        buf[: len(raw)] = raw
        _ioctl(self.fd, KVM_SET_XSAVE, buf)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        from hypervisor.kvm_snapshot_structs import kvm_vcpu_events
        events = kvm_vcpu_events()
        _ioctl(self.fd, KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        _ioctl(self.fd, KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        from hypervisor.kvm_snapshot_structs import kvm_mp_state
        state = kvm_mp_state()
        _ioctl(self.fd, KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        from hypervisor.kvm_snapshot_structs import kvm_mp_state
        _ioctl(self.fd, KVM_SET_MP_STATE, kvm_mp_state(mp_state))

    def get_debugregs(self) -> kvm_debugregs:
        from hypervisor.kvm_snapshot_structs import kvm_debugregs
        dregs = kvm_debugregs()
        _ioctl(self.fd, KVM_GET_DEBUGREGS, dregs)
        return dregs

    def set_debugregs(self, dregs: kvm_debugregs) -> None:
        _ioctl(self.fd, KVM_SET_DEBUGREGS, dregs)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.run_struct = self.io = self.mmio = self.system_event = self.internal = self.fail_entry = None
        self._mmio_data.release()
        self._mv.release()
        try:  # noqa: SIM105 - contextlib is not otherwise imported on the VMM's start-up path
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds an io_data()/run_struct view: munmap happens when that view is released
        super().close()


def _msr_error(op: str, indices: list[int], done: int) -> KvmError:
    bad = indices[done] if 0 <= done < len(indices) else None
    where = f"MSR 0x{bad:x}" if bad is not None else "an MSR"
    return KvmError(
        errno.EINVAL,
        f"{op} handled only {done} of {len(indices)} MSRs: {where} is not supported by KVM "
        f"(check Kvm.msr_index_list())",
        op,
    )
