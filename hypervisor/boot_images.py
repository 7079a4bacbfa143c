"""The boot plan and the kernel + initrd in fresh guest RAM, prepared on a thread while the VMM starts up.

Reading the images into guest RAM is the one slow step of building a VM that needs neither KVM nor most of the
VMM's modules: in the lab they sit on 9p and take 0.2-1 s to arrive. `python -m hypervisor run` starts BootImages
before importing the rest of the VMM, so the reads (which release the GIL) overlap those imports and the KVM
set-up instead of following them. This module therefore imports only what loading needs.
"""

from __future__ import annotations

import os
import threading

from guestboot import layout
from guestboot.loader import plan_boot
from hypervisor.image_file import ImageFile, load_segments
from hypervisor.memory import GuestMemory
from hypervisor.virtio.mmio import cmdline_arg

# virtio-mmio slots, in this order, one 4 KiB window and one IRQ each, announced on the kernel command line;
# Machine attaches the devices in the same order.
VIRTIO_SLOTS = ("rng", "console", "rootfs")  # rootfs: virtio-blk, its backing swapped at claim time


def kernel_cmdline(cmdline: str, extra: list[str] | tuple[str, ...] = ()) -> str:
    """What the guest gets: the user's command line, any extra arguments, then the virtio-mmio devices."""
    virtio = [cmdline_arg(layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQ_BASE + index)
              for index in range(len(VIRTIO_SLOTS))]
    return " ".join([cmdline, *extra, *virtio]).strip()


class BootImages:
    """Fresh guest RAM (`memory`, at once), then on a thread: plan_boot and the images read into that RAM.

    The VM may register `memory` with KVM and set up devices and vCPUs meanwhile; result() waits for the plan.
    """

    def __init__(self, kernel: str, initrd: str | None, cmdline: str, mem_bytes: int, vcpus: int, boot: str,
                 ahead: bool = False):
        """ahead: loading for a request that may come (prepare()): the thread runs niced, behind running VMs."""
        self.plan = self._error = self._thread = None
        self._ahead, self._tid = ahead, None
        try:
            self.memory = GuestMemory(mem_bytes)
        except (OSError, ValueError, OverflowError) as exc:  # a --mem this host cannot map
            self.memory, self._error = None, exc
            return
        self._thread = threading.Thread(target=self._load, args=(kernel, initrd, cmdline, mem_bytes, vcpus, boot),
                                        name="boot-images", daemon=True)
        self._thread.start()

    def _load(self, kernel: str, initrd: str | None, cmdline: str, mem_bytes: int, vcpus: int, boot: str) -> None:
        images: list[ImageFile] = []
        if self._ahead:
            self._tid = threading.get_native_id()
            _renice(self._tid, AHEAD_NICE)
        try:
            for path in (kernel, initrd):
                if path:
                    images.append(ImageFile(path))
            unpacked = None
            cache_file = unpacked_cache_file(kernel) if boot == "unpack" else None
            if cache_file and os.path.exists(cache_file):
                try:
                    images.append(ImageFile(cache_file))
                    unpacked = images[-1].view
                except OSError:
                    pass  # unpacked again below
            def plan_with(unpacked):
                return plan_boot(images[0].view, initrd=images[1].view if initrd else None, cmdline=cmdline,
                                 mem_bytes=mem_bytes, vcpus=vcpus, boot=boot, unpacked=unpacked)
            plan = plan_with(unpacked)
            if unpacked is not None and "fallback" in plan.details:  # a damaged cache file: unpack afresh
                plan = plan_with(None)
            load_segments(self.memory, plan.segments, images)
            if cache_file and plan.unpacked_kernel is not None:
                threading.Thread(target=_keep_unpacked, args=(cache_file, plan.unpacked_kernel),
                                 name="keep-unpacked").start()
            self.plan = plan
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that builds the VM, by result()
            self._error = exc
        finally:
            for image in images:
                image.close()

    def discard(self) -> None:
        """Not used after all (a prepared load the request did not match): wait for the thread, free the RAM."""
        if self._thread is not None:
            self._thread.join()
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def wanted_now(self) -> None:
        """The request came: a load still running ahead gets the process's priority back (if it may)."""
        if self._tid is not None and self._thread is not None and self._thread.is_alive():
            _renice(self._tid, 0)

    def result(self):
        """The BootPlan once its segments are in `memory`; raises whatever loading raised (LoaderError, OSError...)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.plan


AHEAD_NICE = 10  # above the process's own niceness: a load ahead must not slow the VMs booting meanwhile


def _renice(tid: int, above: int) -> None:
    try:  # noqa: SIM105 - contextlib is not imported on the VMM's start-up path
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + above))
    except OSError:
        pass  # back up again needs CAP_SYS_NICE or RLIMIT_NICE: then it finishes at the lower priority


# A warm VMM of the fork server loads the images of the server's last `run` request ahead (hypervisor/forkserver.py):
# (the spec's images_key(), the files' identities, BootImages). The next `run` takes them when it asks for the same.
_PREPARED: list = []


def images_for(spec, ahead: bool = False) -> BootImages:
    """Start loading a `run` RunSpec's kernel and initrd (hypervisor/runspec.py) into fresh guest RAM."""
    return BootImages(spec.kernel, spec.initrd, kernel_cmdline(spec.cmdline), spec.mem_mib << 20, spec.vcpus,
                      spec.boot, ahead=ahead)


def _identities(kernel: str, initrd: str | None) -> list:
    found = []
    for path in (kernel, initrd):
        try:
            stat = os.stat(path) if path else None
            found.append(stat and (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            found.append("missing")
    return found


def prepare(spec) -> None:
    """Start loading a `run` spec's images into fresh guest RAM now, for a later take_prepared() of an equal one."""
    _PREPARED.append((spec.images_key(), _identities(spec.kernel, spec.initrd), images_for(spec, ahead=True)))


def wait_prepared() -> None:
    """Wait until every load started ahead is done (its thread ended): before a warm VMM jails itself."""
    for _, _, images in _PREPARED:
        if images._thread is not None:
            images._thread.join()


def discard_prepared() -> None:
    """The request is not a `run`: free what was loaded ahead for one."""
    while _PREPARED:
        _PREPARED.pop()[2].discard()


def take_prepared(spec) -> BootImages | None:
    """The images prepare() loaded for a spec with the same images_key(), from files unchanged since; else None
    (and the prepared ones are freed)."""
    if not _PREPARED:
        return None
    key, identities, images = _PREPARED.pop()
    if key == spec.images_key() and identities == _identities(spec.kernel, spec.initrd):
        images.wanted_now()
        return images
    images.discard()
    return None


def unpacked_cache_dir() -> str:
    """Where host-unpacked kernels are kept (guestbuild.cache.cache_root(), which this start-up path cannot import:
    subprocess, hashlib, pathlib)."""
    root = os.environ.get("PCLITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pclite")
    return os.path.join(root, "unpacked")


def unpacked_cache_file(kernel: str) -> str | None:
    """Where a bzImage's host-unpacked vmlinux is kept: <cache>/unpacked/<device-inode-size-mtime>.vmlinux, so
    that only the first VM of a kernel pays its decompression (~1.3 s for 10 MB of LZ4 in the lab). A changed
    or replaced file has another name."""
    try:
        stat = os.stat(kernel)
    except OSError:
        return None
    return os.path.join(unpacked_cache_dir(), f"{stat.st_dev:x}-{stat.st_ino:x}-{stat.st_size:x}-{stat.st_mtime_ns:x}"
                                          ".vmlinux")


def _keep_unpacked(cache_file: str, vmlinux) -> None:
    directory, name = os.path.split(cache_file)
    same_kernel = name.rsplit("-", 2)[0] + "-"  # device-inode: older versions of this file
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        with open(tmp, "wb") as out:
            out.write(vmlinux)
        os.replace(tmp, cache_file)
        for other in os.listdir(directory):
            if other.startswith(same_kernel) and other != name:
                os.unlink(os.path.join(directory, other))
    except OSError:
        pass  # unpacked again next time
