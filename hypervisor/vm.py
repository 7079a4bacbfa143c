"""Assemble one microVM from a config: KVM VM, RAM, the boot plan copied in, devices on buses, vCPU threads."""

from __future__ import annotations

import _signal  # not `signal`: that imports enum, ~0.1 s of VMM start-up in the lab
import os
import threading

from guestboot import layout
from guestboot.cpu import initial_cpu_state
from guestboot.plan import BootPlan, LoaderError
from hypervisor import kvm_structs as K
from hypervisor.boot_images import VIRTIO_SLOTS, BootImages, kernel_cmdline
from hypervisor.bus import Bus
from hypervisor.devices.boot_timer import BootTimer
from hypervisor.devices.i8042 import I8042, I8042_DATA
from hypervisor.devices.quiet_ports import QUIET_PORTS, QuietPorts
from hypervisor.devices.serial import COM1_BASE, COM1_IRQ, Serial
from hypervisor.kvm import Kvm, KvmError, buffer_address
from hypervisor.timeline import Timeline
from hypervisor.vcpu import VcpuThread, configure_vcpu, set_boot_registers

TSS_ADDR = 0xFFFBD000  # three pages just below the identity-map page, inside the top-of-4G hole (not RAM)
IDENTITY_MAP_ADDR = 0xFFFBC000
MIN_MEM_MIB = 32
PLACEHOLDER_DISK = "/dev/null"  # reads as a 0-byte file: a disk of capacity 0 until an image is swapped in
MAX_VCPUS = 64


class VmConfigError(ValueError):
    """The requested VM cannot be built; the message says what to change."""


class MachineConfig:
    # A plain class, not a dataclass: importing dataclasses costs ~0.2 s of VMM start-up in the lab.
    def __init__(self, kernel: str, initrd: str | None = None, cmdline: str = "console=ttyS0 panic=-1",
                 mem_mib: int = 256, vcpus: int = 1, boot: str = "auto", console_sink=None,
                 extra_cmdline: list[str] | None = None, agent_sink=None, rootfs: str | None = None,
                 rootfs_read_only: bool = False):
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
        self.mem_mib = mem_mib
        self.vcpus = vcpus
        self.boot = boot  # one of guestboot.loader.BOOT_MODES
        self.console_sink = console_sink  # callable(bytes) or None to discard
        self.extra_cmdline = [] if extra_cmdline is None else extra_cmdline
        self.agent_sink = agent_sink  # callable(bytes): what the guest writes to /dev/hvc0 (the agent channel)
        # The rootfs disk's backing file. None: an empty placeholder (capacity 0, offered writable, since the guest
        # reads the RO feature only when it probes) until PUT /drives/rootfs swaps a real image in.
        self.rootfs = rootfs
        self.rootfs_read_only = rootfs_read_only

    def __repr__(self) -> str:
        return f"MachineConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def validate(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise VmConfigError(f"--vcpus must be 1..{MAX_VCPUS}, got {self.vcpus}")
        if self.mem_mib < MIN_MEM_MIB:
            raise VmConfigError(f"--mem must be at least {MIN_MEM_MIB} MiB, got {self.mem_mib}")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd), ("rootfs", self.rootfs)):
            if path is not None and not os.path.isfile(path):
                raise VmConfigError(f"{what} {path} does not exist or is not a file")


_PREPARED: list = []  # (kvm, vm) made ahead of the request by a pre-forked VMM (hypervisor/forkserver.py)


def prepare_ahead() -> None:
    """Open KVM and make an empty VM with its chips now, for the next build()/restore in this process to take."""
    kvm = Kvm()
    _PREPARED.append((kvm, Machine.prepare_vm(kvm)))


def take_prepared_vm():
    """The (kvm, vm) prepare_ahead() made, once; else None."""
    return _PREPARED.pop() if _PREPARED else None


class Machine:
    def __init__(self, config: MachineConfig, timeline: Timeline | None = None):
        config.validate()
        self.config = config
        self.timeline = timeline or Timeline()
        self.pio_bus = Bus("port-io")
        self.mmio_bus = Bus("mmio")
        self.stopping = False
        self.pause_requested = False
        self.resume_event = threading.Event()
        self.stop_reason = ""
        self.exit_code = 0
        self._stopped = threading.Event()
        self._eventfds: list[int] = []
        self.threads: list[VcpuThread] = []
        self.plan: BootPlan | None = None
        self.kvm = self.vm = self.memory = None

    # ---- build

    def boot_images(self) -> BootImages:
        """Start loading this config's kernel and initrd into fresh guest RAM (on a thread, see BootImages)."""
        cfg = self.config
        return BootImages(cfg.kernel, cfg.initrd, kernel_cmdline(cfg.cmdline, cfg.extra_cmdline), cfg.mem_mib << 20,
                          cfg.vcpus, cfg.boot)

    def build(self, images: BootImages | None = None) -> Machine:
        """`images`: this config's images, already loading (`boot_images()` started early); else started here.
        Everything up to the boot vCPU's registers overlaps the loading; only those wait for the plan."""
        images = images or self.boot_images()
        try:
            self.kvm, self.vm = take_prepared_vm() or (Kvm(), None)
            self.vm = self.vm or self.prepare_vm(self.kvm)
        except KvmError:
            images.result()  # a bad image or command line is the error to report first, as before KVM is touched
            raise
        self.timeline.mark("vm_created")
        self.memory = images.memory or images.result()  # None only if mapping RAM failed: result() raises why
        for slot, (gpa, size, mapping) in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, gpa, size, buffer_address(mapping))
        self._add_devices()
        self._create_vcpus()
        self.plan = images.result()
        self.timeline.mark("kernel_loaded")
        set_boot_registers(self.threads[0].vcpu, initial_cpu_state(self.plan))  # the others wait for INIT/SIPI
        return self

    def build_restored(self, memory, kvm: Kvm | None = None, vm=None) -> Machine:
        """The machine of a snapshot (hypervisor/restore.py): KVM objects, chips, `memory` (already holding the
        guest), devices and bare vCPUs, as build() makes them; no kernel, no registers: the snapshot's state is
        applied next. `vm`: one from prepare_vm(kvm), made ahead. Keep in step with build()."""
        self.kvm = kvm or Kvm()
        self.vm = vm or self.prepare_vm(self.kvm)
        self.timeline.mark("vm_created")
        self.memory = memory
        for slot, (gpa, size, mapping) in enumerate(memory.regions):
            self.vm.set_user_memory_region(slot, gpa, size, buffer_address(mapping))
        self._add_devices()
        for index in range(self.config.vcpus):
            self.threads.append(VcpuThread(self, self.vm.create_vcpu(index)))
        return self

    @staticmethod
    def prepare_vm(kvm: Kvm):
        """A new VM with what precedes RAM and devices in build(): TSS, identity map, irqchip, PIT."""
        vm = kvm.create_vm()
        try:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            vm.create_irqchip()
            vm.create_pit2(K.KVM_PIT_SPEAKER_DUMMY)
        except BaseException:
            vm.close()
            raise
        return vm

    def irq_trigger(self, gsi: int):
        """An edge on `gsi` through an irqfd: one eventfd write, no ioctl."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.vm.irqfd(efd, gsi)
        self._eventfds.append(efd)
        return lambda: os.eventfd_write(efd, 1)

    def _add_devices(self) -> None:
        sink = self.config.console_sink or (lambda data: None)
        self.serial = Serial(sink, self.irq_trigger(COM1_IRQ))
        self.pio_bus.register(COM1_BASE, 8, self.serial)
        self.pio_bus.register(I8042_DATA, 5, I8042(lambda: self.stop("guest reset (i8042)", 0)))
        for port, length in QUIET_PORTS:
            self.pio_bus.register(port, length, QuietPorts())
        self.boot_timer = BootTimer(lambda: self.timeline.mark("init_reached"))
        self.mmio_bus.register(layout.BOOT_TIMER_ADDR, 0x10, self.boot_timer)
        self._add_virtio()

    VIRTIO_SLOTS = VIRTIO_SLOTS  # virtio-mmio slots, in this order (announced on the cmdline by kernel_cmdline)

    def _add_virtio(self) -> None:
        from hypervisor.virtio.blk import BlockDevice
        from hypervisor.virtio.console import ConsoleDevice
        from hypervisor.virtio.mmio import MmioTransport
        from hypervisor.virtio.rng import RngDevice
        self.rng = RngDevice()
        self.console = ConsoleDevice(on_output=self.config.agent_sink)
        cfg = self.config
        self.rootfs = BlockDevice(cfg.rootfs or PLACEHOLDER_DISK, cfg.rootfs_read_only if cfg.rootfs else False,
                                  serial="rootfs")
        devices = (self.rng, self.console, self.rootfs)
        for index, (name, device) in enumerate(zip(self.VIRTIO_SLOTS, devices, strict=True)):
            transport = MmioTransport(device, self.memory, self.irq_trigger(layout.VIRTIO_IRQ_BASE + index), name)
            self.mmio_bus.register(layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE,
                                   layout.VIRTIO_MMIO_SIZE, transport)

    def devices(self) -> list[dict]:
        """What the guest sees, for the control API's /status."""
        found = []
        for bus in (self.pio_bus, self.mmio_bus):
            for base, length, device in bus.devices():
                name = getattr(device, "name", None) or type(device).__name__
                found.append({"bus": bus.name, "base": base, "length": length, "device": name})
        return found

    def _create_vcpus(self) -> None:
        supported = self.kvm.supported_cpuid()
        tsc_deadline = bool(self.kvm.check_extension(K.KVM_CAP_TSC_DEADLINE_TIMER))
        for index in range(self.config.vcpus):
            vcpu = self.vm.create_vcpu(index)
            configure_vcpu(vcpu, supported, index, self.config.vcpus, tsc_deadline)
            self.threads.append(VcpuThread(self, vcpu))

    # ---- run

    def start(self) -> None:
        _signal.signal(_signal.SIGUSR1, lambda *_: None)  # only to interrupt KVM_RUN in a vCPU thread
        for thread in self.threads:
            thread.start()

    def wait(self, timeout: float | None = None) -> int:
        self._stopped.wait(timeout)
        return self.exit_code

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def stop(self, reason: str, code: int) -> None:
        if self.stopping:
            return
        self.stop_reason, self.exit_code = reason, code
        self.stopping = True
        self.timeline.mark("stopped")
        self.resume_event.set()
        for thread in self.threads:
            if thread.is_alive() and thread.ident != threading.get_ident():
                thread.vcpu.request_exit(thread.ident)
        self._stopped.set()

    def pause(self, timeout: float = 5.0) -> bool:
        self.resume_event.clear()
        self.pause_requested = True
        for thread in self.threads:
            thread.vcpu.request_exit(thread.ident)
        return all(thread.paused.wait(timeout) for thread in self.threads)

    def resume(self) -> None:
        self.pause_requested = False
        self.resume_event.set()

    def exit_counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for thread in self.threads:
            for reason, count in enumerate(thread.exit_counts):
                if count:
                    name = K.exit_reason_name(reason)
                    totals[name] = totals.get(name, 0) + count
        return totals

    def close(self) -> None:
        for thread in self.threads:
            if thread.ident is not None:  # never started when build() or start() failed part-way
                thread.join(timeout=2)
        for efd in self._eventfds:
            os.close(efd)
        if getattr(self, "rootfs", None) is not None:
            self.rootfs.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()


__all__ = ["Machine", "MachineConfig", "VmConfigError", "LoaderError", "KvmError"]
