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
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hypervisor.client import VmmClient, VmmError, VmmUnavailable
from service.core.config import Settings
from service.models import CLAIMED, VM
from service.services.errors import Conflict, Forbidden, Invalid, TooLarge, VmmFailed
from service.services.inventory import Inventory
from service.services.work import blocking

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

log = logging.getLogger("pclited")
IMAGE_NAME = "rootfs.ext4"
UNPACK_DIR = "rootfs.unpack"
GUEST_DEVICE = "/dev/vda"
GUEST_MOUNTPOINT = "/rootfs"
MS_RDONLY = 1
DEFAULT_FREE_MIB = 64  # room the container gets for its writes, on top of what the image holds
MKE2FS_HINT = "install e2fsprogs (Debian: apt-get install e2fsprogs; `make deps`)"
CACHE_RECIPE = "pclite-rootfs/2 ext4 b4096 m0 no-journal"  # part of every cache key: bump when mke2fs_command changes
CACHE_KEEP = 8


SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_MAGICLINKS, RESOLVE_BENEATH = 0x02, 0x08
ROOTS_HINT = ("set rootfs_path_roots (PCLITE_ROOTFS_PATH_ROOTS='[\"/dir\"]' or `rootfs_path_roots:` in the YAML "
              "config) to the directories clients may name, or send the rootfs as a tar stream (Content-Type: "
              "application/x-tar)")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags, 0, resolve)
    fd = libc.syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk_beneath(dir_fd: int, relative: str, flags: int) -> int:
    """openat2's RESOLVE_BENEATH for kernels without it (< 5.6): one component at a time, no symlink at all."""
    fd = os.dup(dir_fd)
    try:
        for part in relative.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                raise OSError(errno.EXDEV, "'..' in the path", relative)
            try:
                fd, parent = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd), fd
            except NotADirectoryError:  # O_DIRECTORY is checked first: say it was a symlink when it was
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "a symlink in the path", relative) from None
                raise
            os.close(parent)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_beneath(roots: list[Path], path: str) -> int:
    """An O_DIRECTORY fd of path, which must lie beneath one of roots: resolved by the kernel from the opened root
    with RESOLVE_BENEATH (`..` and symlinks, absolute or not, cannot leave it) and no /proc magic links, so what
    is built from the fd is what was checked, whatever the path's components are swapped for afterwards."""
    if not roots:
        raise Forbidden(f"a rootfs by path is off on this pclited: {ROOTS_HINT}")
    if not path.startswith("/"):
        raise Invalid(f"rootfs path {path} is not an absolute path to a directory on the pclited host: give one "
                      f"beneath {', '.join(map(str, roots))}, or send the rootfs as a tar stream (Content-Type: "
                      "application/x-tar)")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    for root in roots:
        prefix = str(root).rstrip("/") + "/"
        if path != str(root) and not path.startswith(prefix):
            continue
        relative = path[len(prefix):] or "."
        try:
            root_fd = os.open(root, flags)
        except OSError as exc:
            raise Forbidden(f"rootfs root {root} cannot be opened ({exc.strerror}): fix rootfs_path_roots") from None
        try:
            try:
                return _openat2(root_fd, relative, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                return _walk_beneath(root_fd, relative, flags)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ELOOP):
                raise Forbidden(f"rootfs path {path} leaves {root} (through '..' or a symlink): give a directory "
                                f"inside it") from None
            raise Invalid(f"rootfs path {path} is not a directory on the pclited host that it can read "
                          f"({exc.strerror}): give one beneath {root}, or send the rootfs as a tar stream") from None
        finally:
            os.close(root_fd)
    raise Forbidden(f"rootfs path {path} is beneath none of rootfs_path_roots ({', '.join(map(str, roots))}): give a "
                    "directory inside one of them, or send the rootfs as a tar stream (Content-Type: "
                    "application/x-tar)")


def image_path(vm: VM) -> Path:
    return Path(vm.console_path).parent / IMAGE_NAME


def measure(root: Path, extra: str = "") -> tuple[int, int, str]:
    """(bytes in 4 KiB blocks, inode count, metadata key) of a directory tree, not following symlinks; extra: what
    is done to the image besides (the tar path's debugfs script), part of the key."""
    used, inodes = 0, 1
    digest = hashlib.sha256(f"{CACHE_RECIPE}\0{extra}\0".encode(errors="surrogateescape"))
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


def build_image(source: Path, image: Path, size_mib: int | None = None, cache: Path | None = None,
                script: list[str] | None = None, max_bytes: int | None = None, pass_fds: tuple[int, ...] = ()) -> dict:
    """mke2fs -d source into image (sparse); size_mib None = what source holds + DEFAULT_FREE_MIB. With a cache
    directory, an image of the same tree is copied from there (and a new one kept there). script: debugfs commands
    run on the image after mke2fs (what the tar path keeps off the host tree: owners, modes, links, devices).
    max_bytes: the most the image may take (its apparent size: a guest can fill every byte of it). pass_fds: for
    a source under /proc/self/fd."""
    started = time.monotonic()
    max_mib = max_bytes >> 20 if max_bytes else None
    if max_mib is not None and size_mib is not None and size_mib > max_mib:
        raise TooLarge(f"size_mib={size_mib} is over this pclited's rootfs quota of {max_mib} MiB "
                       "(rootfs_max_bytes): ask for less, or leave size_mib out")
    used, inodes, key = measure(source, "\n".join(script or ()))
    made = sum(1 for command in script or () if command.startswith(("symlink ", "mknod ")))  # not in the tree
    used, inodes = used + made * 4096, inodes + made
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
    if max_mib is not None and needed_mib > max_mib:
        raise TooLarge(f"this rootfs needs a {needed_mib} MiB image ({used >> 20} MiB in {inodes} files), over this "
                       f"pclited's rootfs quota of {max_mib} MiB (rootfs_max_bytes): send a smaller rootfs")
    if size_mib is None:
        size_mib = min(needed_mib + DEFAULT_FREE_MIB, max_mib or needed_mib + DEFAULT_FREE_MIB)
    elif size_mib < needed_mib:
        raise Invalid(f"size_mib={size_mib} is too small for this rootfs ({used >> 20} MiB in {inodes} files): "
                      f"ask for at least {needed_mib}, or leave size_mib out")
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    proc = subprocess.run(mke2fs_command(source, image, size_mib, inodes + 4096), capture_output=True, text=True,
                          check=False, pass_fds=pass_fds)
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise VmmFailed(f"mke2fs of {source} failed (exit {proc.returncode}): {why[-1] if why else 'no output'}; "
                        f"is the rootfs readable by pclited and the disk under {image.parent} not full?")
    if script:
        try:
            run_debugfs(image, script)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            raise
    if cached is not None:
        _keep(image, cached)
    return {"image_bytes": image.stat().st_size, "content_bytes": used, "files": inodes, "size_mib": size_mib,
            "cached": False, "cache_entry": str(cached) if cached is not None and cached.exists() else None,
            "build_ms": round((time.monotonic() - started) * 1000, 3)}


def run_debugfs(image: Path, script: list[str]) -> None:
    """The commands on the image, in order; any command's error fails the whole (debugfs itself exits 0)."""
    if shutil.which("debugfs") is None:
        raise VmmFailed(f"debugfs is not installed on the pclited host: {MKE2FS_HINT}")
    proc = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], capture_output=True, check=False,
                          input="\n".join(script).encode(errors="surrogateescape") + b"\n")
    errors = [line for line in proc.stderr.decode(errors="replace").splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    if proc.returncode != 0 or errors:
        raise VmmFailed(f"debugfs on the rootfs image failed (exit {proc.returncode}): "
                        f"{(errors or ['no output'])[0]}")


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


MAX_TAR_HEADER = 256 << 10  # pax records, long names, a sparse map: tarfile holds one whole in memory
EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
CHUNK = 1 << 16
SPECIAL_TYPES = {tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                 tarfile.FIFOTYPE: stat.S_IFIFO}


class _Header(tarfile.TarInfo):
    @classmethod
    def frombuf(cls, buf, encoding, errors):
        header = super().frombuf(buf, encoding, errors)
        if header.type in EXTENDED_HEADERS and header.size > MAX_TAR_HEADER:
            raise tarfile.HeaderError(f"a {header.size}-byte extended header (the limit is {MAX_TAR_HEADER})")
        return header


class _Reader:
    """The body's pipe as tarfile reads it, never more than MAX_TAR_HEADER past the current member's data (a GNU
    1.0 sparse map is read whole into a list before the member is seen)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pos, self.limit = fd, 0, MAX_TAR_HEADER + tarfile.RECORDSIZE

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.limit:
            raise Invalid(f"the rootfs tar stream has a header over {MAX_TAR_HEADER >> 10} KiB: send a plain "
                          "`tar -C ROOTFS -c .`")
        data = os.read(self.fd, min(CHUNK if size < 0 else size, self.limit - self.pos))
        self.pos += len(data)
        return data


def _quoted(path: str) -> str:
    """A path as one debugfs argument (its parser knows double quotes, not escapes)."""
    if '"' in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise Invalid(f"rootfs tar member {path!r} has a quote or a control character in its name or link target: "
                      "pclited cannot put it in an image")
    return f'"{path}"'


class Untar:
    """A tar stream into `root` holding only directories and regular files, owned by pclited, no setuid/setgid/
    sticky bit, no group or other write: nothing on the host a user could use. The rest of each member (owner,
    the full mode, symlinks, device nodes, FIFOs) becomes `script`, debugfs commands applied to the image, so the
    container sees its files as they were. Member names are checked lexically (no `..`) and the host tree holds
    no symlink, so no path inside it can resolve outside. Declared sizes count against max_bytes before any data
    is written (a sparse member counts its full size)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self.used = 0
        self.script: list[str] = []
        self.specials: dict[str, tuple[int, str]] = {}  # name -> (file type, debugfs command): for hard links
        self.dir_times: list[tuple[Path, int]] = []

    def run(self, fd: int) -> list[str]:
        reader = _Reader(fd)
        try:
            with tarfile.open(fileobj=reader, mode="r|", tarinfo=_Header) as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # stream mode keeps every member otherwise: a million-file tar's worth
                    reader.limit = tar.offset + MAX_TAR_HEADER + tarfile.RECORDSIZE
                    self.member(tar, member)
        except tarfile.TarError as exc:
            raise Invalid(f"the body is not a tar stream of a rootfs ({exc}): send `tar -C ROOTFS -c .` with "
                          "Content-Type: application/x-tar") from None
        for path, mtime in reversed(self.dir_times):  # children first: their creation touched the parents
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        return self.script

    @staticmethod
    def parts(name: str, what: str = "member") -> list[str]:
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts or "\0" in name:
            raise Invalid(f"rootfs tar {what} {name!r} contains '..': send a tar of the rootfs made with "
                          "`tar -C ROOTFS -c .`")
        return parts

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self.parts(member.name)
        name = "/".join(parts)
        self.used += max(4096, (member.size + 4095) & ~4095) if member.isreg() else 4096  # inode, dirent, block
        if self.used > self.max_bytes:
            raise TooLarge(f"the rootfs tar declares more than this pclited's rootfs quota of {self.max_bytes >> 20} "
                           f"MiB (rootfs_max_bytes) by member {name or '/'!r}: send a smaller rootfs")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in self.specials:
                raise Invalid(f"rootfs tar member {name!r} lies beneath {'/'.join(parts[:depth])!r}, which is not a "
                              "directory: send `tar -C ROOTFS -c .`")
        if name in self.specials:
            raise Invalid(f"rootfs tar member {name!r} appears twice: send `tar -C ROOTFS -c .`")
        host = self.root.joinpath(*parts)
        if parts:
            self.mkdirs(host.parent)
        if member.isdir():
            self.mkdirs(host)
            self.dir_times.append((host, int(member.mtime) * 10**9))
            self.fix(name, host, member.mode, member.uid, member.gid)
        elif member.isreg():
            self.write(tar, member, host)
            self.fix(name, host, member.mode, member.uid, member.gid)
        elif member.islnk():
            target = "/".join(self.parts(member.linkname, f"member {name!r}'s hard link target"))
            if target in self.specials:
                self.special(name, *self.specials[target], member)
                return
            try:
                if not stat.S_ISREG(os.lstat(self.root.joinpath(target)).st_mode):
                    raise FileNotFoundError
                os.link(self.root.joinpath(target), host, follow_symlinks=False)
            except OSError:
                raise Invalid(f"rootfs tar member {name!r} is a hard link to {member.linkname!r}, which is no file "
                              "earlier in the tar: send `tar -C ROOTFS -c .`") from None
        elif member.type in SPECIAL_TYPES:
            kind = SPECIAL_TYPES[member.type]
            make = f"symlink {_quoted(member.linkname)}" if kind == stat.S_IFLNK else "mknod p" \
                if kind == stat.S_IFIFO else f"mknod {'c' if kind == stat.S_IFCHR else 'b'} {member.devmajor} " \
                f"{member.devminor}"
            self.special(name, kind, make, member)
        else:
            raise Invalid(f"rootfs tar member {name!r} is of a type pclited does not unpack ({member.type!r})")

    def mkdirs(self, path: Path) -> None:
        try:
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Invalid(f"rootfs tar member {str(path.relative_to(self.root))!r} is both a file and a directory: "
                          "send `tar -C ROOTFS -c .`") from None

    def write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, host: Path) -> None:
        """The member's data, its zero blocks left as holes (a sparse member stays sparse)."""
        try:
            fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         (member.mode & 0o755) | 0o600)
        except FileExistsError:
            raise Invalid(f"rootfs tar member {member.name!r} appears twice: send `tar -C ROOTFS -c .`") from None
        try:
            source = tar.extractfile(member)
            while chunk := source.read(CHUNK):
                if chunk.count(0) == len(chunk):
                    os.lseek(fd, len(chunk), os.SEEK_CUR)
                else:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.ftruncate(fd, member.size)
            os.utime(fd, ns=(int(member.mtime) * 10**9,) * 2)
        finally:
            os.close(fd)

    def fix(self, name: str, host: Path, mode: int, uid: int, gid: int) -> None:
        """debugfs commands for what the host copy lacks: its owner, setuid/setgid/sticky, write bits."""
        st = os.lstat(host)
        path = _quoted("/" + name)
        if stat.S_IMODE(st.st_mode) != mode & 0o7777:
            self.script.append(f"set_inode_field {path} mode 0{stat.S_IFMT(st.st_mode) | (mode & 0o7777):o}")
        if st.st_uid != uid:
            self.script.append(f"set_inode_field {path} uid {uid}")
        if st.st_gid != gid:
            self.script.append(f"set_inode_field {path} gid {gid}")

    def special(self, name: str, kind: int, make: str, member: tarfile.TarInfo) -> None:
        """A symlink, device node or FIFO, made in the image only. make: "VERB ARGS", debugfs's symlink or mknod,
        which take a name in the current directory (the name goes between verb and args)."""
        if not name:
            raise Invalid("the rootfs tar's root is not a directory: send `tar -C ROOTFS -c .`")
        self.specials[name] = (kind, make)
        parent, _, base = name.rpartition("/")
        verb, _, args = make.partition(" ")
        mode = kind | (0o777 if kind == stat.S_IFLNK else member.mode & 0o7777)
        self.script += [f"cd {_quoted('/' + parent)}", f"{verb} {_quoted(base)} {args}",
                        f"set_inode_field {_quoted(base)} mode 0{mode:o}",
                        f"set_inode_field {_quoted(base)} uid {member.uid}",
                        f"set_inode_field {_quoted(base)} gid {member.gid}", "cd /"]


class RootfsService:
    def __init__(self, settings: Settings, inventory: Inventory, hand_over=lambda image: None) -> None:
        """hand_over(image): makes a built image the VM's own (its jail's uid), before its VMM opens it."""
        self.settings, self.inventory, self.hand_over = settings, inventory, hand_over
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

    def _within_quota(self, size_mib: int | None) -> None:
        max_mib = self.settings.rootfs_max_bytes >> 20
        if size_mib is not None and size_mib > max_mib:
            raise TooLarge(f"size_mib={size_mib} is over this pclited's rootfs quota of {max_mib} MiB "
                           "(rootfs_max_bytes): ask for less, or leave size_mib out")

    async def _claimed(self, vm_id: str) -> VM:
        vm = await asyncio.to_thread(self.inventory.get, vm_id)
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
        self._within_quota(size_mib)
        fd = open_beneath(self.settings.rootfs_path_roots, path)  # refused before anything is built or cached
        try:
            vm = await self._claimed(vm_id)
            self._busy.add(vm_id)
            try:
                return await self._attach(vm, Path(f"/proc/self/fd/{fd}"), read_only, size_mib, {"source": "path"},
                                          mounts or [], hostname, pass_fds=(fd,))
            finally:
                self._busy.discard(vm_id)
        finally:
            os.close(fd)

    async def attach_tar(self, vm_id: str, body: AsyncIterator[bytes], read_only: bool,
                         size_mib: int | None) -> dict:
        self._within_quota(size_mib)
        vm = await self._claimed(vm_id)
        self._busy.add(vm_id)
        unpack = Path(vm.console_path).parent / UNPACK_DIR
        try:
            started = time.monotonic()
            received, script = await self._unpack(body, unpack, self.settings.rootfs_max_bytes)
            extra = {"source": "tar", "tar_bytes": received, "unpack_ms": round((time.monotonic() - started) * 1000, 3)}
            return await self._attach(vm, unpack, read_only, size_mib, extra, script=script)
        finally:
            self._busy.discard(vm_id)
            await asyncio.to_thread(shutil.rmtree, unpack, True)

    @staticmethod
    async def _unpack(body: AsyncIterator[bytes], target: Path, max_bytes: int) -> tuple[int, list[str]]:
        """Stream the body through a pipe into Untar (a thread) under target; returns the bytes received and the
        debugfs script for the image. On an error, nothing is left under target."""
        await asyncio.to_thread(shutil.rmtree, target, True)
        target.mkdir(parents=True, mode=0o700)
        read_fd, write_fd = os.pipe()

        def unpack() -> list[str]:
            try:
                return Untar(target, max_bytes).run(read_fd)
            finally:
                os.close(read_fd)  # the writer gets EPIPE: the rest of the body is not read

        def send(chunk: bytes) -> None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(write_fd, view):]

        reader = asyncio.ensure_future(asyncio.to_thread(unpack))
        received = 0
        try:
            async for chunk in body:
                received += len(chunk)
                if reader.done():
                    break
                await asyncio.to_thread(send, chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # Untar stopped: its own error below says why
        finally:
            os.close(write_fd)
            try:
                script = await asyncio.shield(reader)
            except Exception:
                await asyncio.to_thread(shutil.rmtree, target, True)
                if received == 0:
                    raise Invalid("the body is empty: send `tar -C ROOTFS -c .` with Content-Type: "
                                  "application/x-tar") from None
                raise
        return received, script

    async def _attach(self, vm: VM, source: Path, read_only: bool, size_mib: int | None, extra: dict,
                      mounts: list[dict] | None = None, hostname: str | None = None, script: list[str] | None = None,
                      pass_fds: tuple[int, ...] = ()) -> dict:
        image = image_path(vm)
        built = await blocking(build_image, source, image, size_mib, self.settings.data_dir / "rootfs-cache",
                               script, self.settings.rootfs_max_bytes, pass_fds)
        self.hand_over(image)  # a jailed VMM opens it as the VM's own uid
        mounts = [{"source": GUEST_DEVICE, "target": GUEST_MOUNTPOINT, "fstype": "ext4",
                   "flags": MS_RDONLY if read_only else 0, "data": "", "mkdir": True}, *(mounts or [])]

        def swap_and_mount(client) -> None:  # one thread, the mounts in one request: the agent does them in order
            client.swap_drive(str(image), read_only)
            client.mounts(mounts)
            if hostname:
                client.set_hostname(hostname)

        try:
            started = time.monotonic()
            await blocking(swap_and_mount, VmmClient(vm.api_socket, timeout=30.0))
            attach_ms = round((time.monotonic() - started) * 1000, 3)
        except Exception as exc:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()  # the next attempt (or the VM's deletion) starts clean
            if isinstance(exc, VmmUnavailable):
                raise Conflict(f"VM {vm.id}'s VMM is gone ({exc}): delete it and claim another") from exc
            if isinstance(exc, VmmError):
                what = "the rootfs and the container's mounts" if len(mounts) > 1 or hostname else "the rootfs"
                raise VmmFailed(f"attaching {what} to {vm.id} failed: {exc}") from exc
            raise
        if built.get("cache_entry"):
            make_spare_in_background(Path(built["cache_entry"]))
        self._after_answer(asyncio.to_thread(
            self.inventory.event, "vm.rootfs", f"rootfs attached ({built['image_bytes'] >> 20} MiB image, "
            f"{built['files']} files, {'cached' if built['cached'] else 'built'} in {built['build_ms']:.0f} ms)",
            vm.id, vm.flavor))
        return {"vm_id": vm.id, "device": GUEST_DEVICE, "mountpoint": GUEST_MOUNTPOINT, "read_only": read_only,
                "image": str(image), **built, **extra, "attach_ms": attach_ms, "mounts": len(mounts) - 1,
                "hostname": hostname}
