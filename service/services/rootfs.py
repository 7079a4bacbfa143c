"""A container's root filesystem into a claimed VM: a directory (local path, or a tar stream unpacked here) becomes an
ext4 image (`mke2fs -d`, e2fsprogs), the VMM swaps it in as the VM's rootfs disk, and the agent mounts it.

The image lives next to the VM's console log and goes when the VM stops (Launcher.cleanup). No journal: the disk
lives and dies with one VM, so crash consistency buys nothing and the journal would cost space and write time.

Images are cached by the tree's metadata (paths, modes, owners, sizes, mtimes, link targets; containerd hands every
container of an image a fresh copy of the same tree): a hit costs the walk plus a sparse copy instead of mke2fs.
A file rewritten in place with its size and mtime kept would be missed; a container engine's snapshots never do that.
Directory mtimes are left out of the key: a snapshotter's copy (containerd's native one) sets them at copy time, so
with them no two containers would share an image; a hit shows the directory mtimes of the copy that built it.
Next to each cached image waits a spare copy, made at low priority after an attach: the next hit renames it into
place instead of copying on the container's critical path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from service.models import CLAIMED, VM
from service.services.errors import Conflict, Invalid, VmmFailed
from service.services.vmm import LaunchError, blocking, client_module

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from service.services.runtime import Runtime

log = logging.getLogger("pclited")
IMAGE_NAME = "rootfs.ext4"
UNPACK_DIR = "rootfs.unpack"
GUEST_DEVICE = "/dev/vda"
GUEST_MOUNTPOINT = "/rootfs"
MS_RDONLY = 1
DEFAULT_FREE_MIB = 64  # room the container gets for its writes, on top of what the image holds
MAX_TAR_BYTES = 16 << 30
MKE2FS_HINT = "install e2fsprogs (Debian: apt-get install e2fsprogs; `make deps`)"
CACHE_RECIPE = "pclite-rootfs/2 ext4 b4096 m0 no-journal"  # part of every cache key: bump when mke2fs_command changes
CACHE_KEEP = 8


def image_path(vm: VM) -> Path:
    return Path(vm.console_path).parent / IMAGE_NAME


def measure(root: Path) -> tuple[int, int, str]:
    """(bytes in 4 KiB blocks, inode count, metadata key) of a directory tree, not following symlinks."""
    used, inodes = 0, 1
    digest = hashlib.sha256(f"{CACHE_RECIPE}\0".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            inodes += 1
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                used += (st.st_size + 4095) & ~4095
                link = os.readlink(path) if os.path.islink(path) else ""
                mtime = 0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns  # see the module's docstring
                digest.update(f"{os.path.relpath(path, root)}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}"
                              f"\0{mtime}\0{st.st_rdev}\0{link}\0".encode(errors="surrogateescape"))
    return used, inodes, digest.hexdigest()[:32]


def sparse_copy(source: Path, target: Path) -> None:
    """Copy only the allocated extents of source (SEEK_DATA/SEEK_HOLE, copy_file_range): an image is mostly holes."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                start += os.copy_file_range(src.fileno(), dst.fileno(), end - start, start, start)
            offset = end


def mke2fs_command(source: Path, image: Path, size_mib: int, inodes: int) -> list[str]:
    return ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "^has_journal", "-N", str(inodes),
            "-E", "nodiscard", "-d", str(source), str(image), f"{size_mib}M"]


def build_image(source: Path, image: Path, size_mib: int | None = None, cache: Path | None = None) -> dict:
    """mke2fs -d source into image (sparse); size_mib None = what source holds + DEFAULT_FREE_MIB. With a cache
    directory, an image of the same tree is copied from there (and a new one kept there)."""
    started = time.monotonic()
    used, inodes, key = measure(source)
    cached = cache / f"{key}-{size_mib or 0}.ext4" if cache is not None else None
    if cached is not None and cached.exists():
        with contextlib.suppress(FileNotFoundError):
            os.utime(cached)  # most recently used: evicted last
            try:
                os.rename(spare_path(cached), image)  # the copy made ahead of time
            except OSError:  # none (taken, or not made yet), or another filesystem
                sparse_copy(cached, image)
            return {"image_bytes": image.stat().st_size, "content_bytes": used, "files": inodes,
                    "size_mib": image.stat().st_size >> 20, "cached": True, "cache_entry": str(cached),
                    "build_ms": round((time.monotonic() - started) * 1000, 3)}
    if shutil.which("mke2fs") is None:
        raise VmmFailed(f"mke2fs is not installed on the pclited host: {MKE2FS_HINT}")
    needed_mib = (used * 5 // 4 + inodes * 256) // (1 << 20) + 8  # ext4 metadata, inode tables, slack
    if size_mib is None:
        size_mib = needed_mib + DEFAULT_FREE_MIB
    elif size_mib < needed_mib:
        raise Invalid(f"size_mib={size_mib} is too small for this rootfs ({used >> 20} MiB in {inodes} files): "
                      f"ask for at least {needed_mib}, or leave size_mib out")
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    proc = subprocess.run(mke2fs_command(source, image, size_mib, inodes + 4096), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise VmmFailed(f"mke2fs of {source} failed (exit {proc.returncode}): {why[-1] if why else 'no output'}; "
                        f"is the rootfs readable by pclited and the disk under {image.parent} not full?")
    if cached is not None:
        _keep(image, cached)
    return {"image_bytes": image.stat().st_size, "content_bytes": used, "files": inodes, "size_mib": size_mib,
            "cached": False, "cache_entry": str(cached) if cached is not None and cached.exists() else None,
            "build_ms": round((time.monotonic() - started) * 1000, 3)}


def spare_path(cached: Path) -> Path:
    return cached.with_suffix(".spare")


def make_spare(cached: Path) -> None:
    """A ready copy of a cached image for its next hit (no-op when one is there)."""
    spare = spare_path(cached)
    if spare.exists() or not cached.exists():
        return
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.{threading.get_native_id()}.partial")
    try:
        sparse_copy(cached, partial)
        os.replace(partial, spare)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def make_spare_in_background(cached: Path, nice: int = 10) -> threading.Thread:
    """make_spare in its own thread at a lower priority (nice is per thread): housekeeping, not anyone's request."""
    def run() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                         + nice))
        make_spare(cached)

    thread = threading.Thread(target=run, name="pclited-rootfs-spare", daemon=True)
    thread.start()
    return thread


def _keep(image: Path, cached: Path) -> None:
    """Put a copy of a fresh image in the cache, and evict the least recently used beyond CACHE_KEEP."""
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.{time.monotonic_ns()}.partial")
        sparse_copy(image, partial)
        os.replace(partial, cached)
        entries = sorted(cached.parent.glob("*.ext4"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[CACHE_KEEP:]:
            old.unlink()
            with contextlib.suppress(FileNotFoundError):
                spare_path(old).unlink()


class RootfsService:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._busy: set[str] = set()  # VMs whose rootfs is being attached: a second request is a conflict
        self._tasks: set[asyncio.Task] = set()  # work done after the answer (the event log line)

    def _after_answer(self, work) -> None:
        """Run work without making the request wait for it (a log line nobody reads before the answer)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(finished: asyncio.Task) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("rootfs: logging an event failed: %s", finished.exception())

        task.add_done_callback(done)

    async def _claimed(self, vm_id: str) -> VM:
        vm = await asyncio.to_thread(self.rt.inv.get, vm_id)
        if vm.state != CLAIMED:
            raise Conflict(f"VM {vm_id} is {vm.state}: a rootfs goes only into a claimed VM (claim one with "
                           "POST /v1/vms)")
        if vm_id in self._busy or image_path(vm).exists():
            raise Conflict(f"VM {vm_id} already has a rootfs (or one is being attached): claim another VM for "
                           "another container")
        return vm

    async def attach_path(self, vm_id: str, path: str, read_only: bool, size_mib: int | None,
                          mounts: list[dict] | None = None, hostname: str | None = None) -> dict:
        """mounts, hostname: what the container needs besides its rootfs, done with it (one trip to the VMM)."""
        source = Path(path)
        if not source.is_absolute() or not source.is_dir():
            raise Invalid(f"rootfs path {path} is not an absolute path to a directory on the pclited host: give a "
                          "directory pclited can read, or send the rootfs as a tar stream (Content-Type: "
                          "application/x-tar)")
        vm = await self._claimed(vm_id)
        self._busy.add(vm_id)
        try:
            return await self._attach(vm, source, read_only, size_mib, {"source": "path"}, mounts or [], hostname)
        finally:
            self._busy.discard(vm_id)

    async def attach_tar(self, vm_id: str, body: AsyncIterator[bytes], read_only: bool,
                         size_mib: int | None) -> dict:
        vm = await self._claimed(vm_id)
        self._busy.add(vm_id)
        unpack = Path(vm.console_path).parent / UNPACK_DIR
        try:
            started = time.monotonic()
            received = await self._unpack(body, unpack)
            extra = {"source": "tar", "tar_bytes": received, "unpack_ms": round((time.monotonic() - started) * 1000, 3)}
            return await self._attach(vm, unpack, read_only, size_mib, extra)
        finally:
            self._busy.discard(vm_id)
            await asyncio.to_thread(shutil.rmtree, unpack, True)

    async def _unpack(self, body: AsyncIterator[bytes], target: Path) -> int:
        """Stream the body into GNU tar (it refuses absolute and `..` member names and keeps owners, modes and
        device nodes as root does); returns the bytes received."""
        await asyncio.to_thread(shutil.rmtree, target, True)
        target.mkdir(parents=True)
        proc = await asyncio.create_subprocess_exec(
            "tar", "-x", "-f", "-", "-C", str(target), "--numeric-owner", "--no-overwrite-dir",
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        received = 0
        try:
            async for chunk in body:
                received += len(chunk)
                if received > MAX_TAR_BYTES:
                    raise Invalid(f"the rootfs tar stream is over {MAX_TAR_BYTES >> 30} GiB: send a smaller rootfs")
                proc.stdin.write(chunk)
                await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # tar gave up: its own message below says why
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        stderr = (await proc.stderr.read()).decode(errors="replace").strip()
        if await proc.wait() != 0 or received == 0:
            said = [line for line in stderr.splitlines() if "Exiting with failure" not in line]
            why = "an empty body" if received == 0 else (said or ["tar failed"])[-1]
            raise Invalid(f"the body is not a tar stream of a rootfs ({why}): send `tar -C ROOTFS -c .` with "
                          "Content-Type: application/x-tar")
        return received

    async def _attach(self, vm: VM, source: Path, read_only: bool, size_mib: int | None, extra: dict,
                      mounts: list[dict] | None = None, hostname: str | None = None) -> dict:
        image = image_path(vm)
        built = await blocking(build_image, source, image, size_mib, self.rt.settings.data_dir / "rootfs-cache")
        self.rt.launcher.jails.hand_over(image)  # a jailed VMM opens it as the VM's own uid
        mounts = [{"source": GUEST_DEVICE, "target": GUEST_MOUNTPOINT, "fstype": "ext4",
                   "flags": MS_RDONLY if read_only else 0, "data": "", "mkdir": True}, *(mounts or [])]

        def swap_and_mount(client) -> None:  # one thread, the mounts in one request: the agent does them in order
            client.swap_drive(str(image), read_only)
            client.mounts(mounts)
            if hostname:
                client.set_hostname(hostname)

        try:
            started = time.monotonic()
            await blocking(swap_and_mount, client_module().VmmClient(vm.api_socket, timeout=30.0))
            attach_ms = round((time.monotonic() - started) * 1000, 3)
        except LaunchError as exc:
            raise VmmFailed(str(exc)) from exc
        except Exception as exc:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()  # the next attempt (or the VM's deletion) starts clean
            mod = client_module()
            if isinstance(exc, mod.VmmUnavailable):
                raise Conflict(f"VM {vm.id}'s VMM is gone ({exc}): delete it and claim another") from exc
            if isinstance(exc, mod.VmmError):
                what = "the rootfs and the container's mounts" if len(mounts) > 1 or hostname else "the rootfs"
                raise VmmFailed(f"attaching {what} to {vm.id} failed: {exc}") from exc
            raise
        if built.get("cache_entry"):
            make_spare_in_background(Path(built["cache_entry"]))
        self._after_answer(asyncio.to_thread(
            self.rt.inv.event, "vm.rootfs", f"rootfs attached ({built['image_bytes'] >> 20} MiB image, "
            f"{built['files']} files, {'cached' if built['cached'] else 'built'} in {built['build_ms']:.0f} ms)",
            vm.id, vm.flavor))
        return {"vm_id": vm.id, "device": GUEST_DEVICE, "mountpoint": GUEST_MOUNTPOINT, "read_only": read_only,
                "image": str(image), **built, **extra, "attach_ms": attach_ms, "mounts": len(mounts) - 1,
                "hostname": hostname}
