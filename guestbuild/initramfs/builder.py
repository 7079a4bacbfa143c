"""The guest initramfs: busybox-static with its applet links, the pclite /init, the agent, and any extra files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from guestbuild.agent.build import build_agent
from guestbuild.cache import BuildError, cache_root, content_key, describe_os_error, publish_dir
from guestbuild.initramfs.cpio import CpioArchive

INIT_SCRIPT = Path(__file__).with_name("init.sh")
DEFAULT_BUSYBOX = Path("/bin/busybox")
AGENT_GUEST_PATH = "sbin/pclite-agent"
RECIPE_VERSION = "1"


def busybox_path() -> Path:
    return Path(os.environ.get("PCLITE_BUSYBOX", DEFAULT_BUSYBOX))


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF64 with no PT_INTERP program header (no dynamic loader needed inside the guest)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for index in range(phnum):
        offset = phoff + index * phentsize
        if int.from_bytes(data[offset:offset + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def read_busybox(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BuildError(f"busybox not found at {path}: install the Debian package busybox-static "
                         f"(`make deps` as root)") from None
    if not _is_static_elf(data):
        raise BuildError(f"{path} is not a static x86_64 busybox (the guest has no libc): install busybox-static, "
                         f"or point PCLITE_BUSYBOX at a static build")
    return data


def busybox_applets(path: Path) -> list[str]:
    out = subprocess.run([str(path), "--list-full"], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise BuildError(f"`{path} --list-full` failed; is it a working busybox? install busybox-static")
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def compose(busybox: bytes, applets: list[str], init: bytes, extra: dict[str, tuple[bytes, int]]) -> CpioArchive:
    archive = CpioArchive()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "root"):
        archive.add_dir(directory)
    archive.add_char_device("dev/console", 5, 1)  # the kernel opens it before devtmpfs is mounted
    archive.add_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")
    archive.add_file("init", init, 0o755)
    archive.add_file("etc/hostname", b"pclite\n")
    for path, (data, perm) in extra.items():
        archive.add_file(path, data, perm)
    return archive


def build_initramfs(extra_files: dict[str, Path] | None = None, compress: bool = True, agent: bool = True) -> Path:
    """Build (or find cached) the initramfs; extra_files maps guest paths to host files.

    With agent (the default) the guest agent is built (cached) and added at /sbin/pclite-agent, unless extra_files
    already gives one.
    """
    bb_path = busybox_path()
    busybox = read_busybox(bb_path)
    init = INIT_SCRIPT.read_bytes()
    files = {path.lstrip("/"): host for path, host in (extra_files or {}).items()}
    if agent and AGENT_GUEST_PATH not in files:
        files[AGENT_GUEST_PATH] = build_agent()
    extra = {}
    for guest_path, host_path in sorted(files.items()):
        try:
            extra[guest_path] = (Path(host_path).read_bytes(), 0o755)
        except FileNotFoundError:
            raise BuildError(f"initramfs extra file {host_path} is missing") from None
    key_parts = [b"pclite-initramfs", RECIPE_VERSION, busybox, init, str(compress)]
    for guest_path, (data, perm) in extra.items():
        key_parts += [guest_path, data, str(perm)]
    directory = cache_root() / "initramfs" / content_key(*key_parts)
    name = "initramfs.cpio.gz" if compress else "initramfs.cpio"
    if (directory / name).exists():
        return directory / name
    archive = compose(busybox, busybox_applets(bb_path), init, extra)
    try:
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / name).write_bytes(archive.to_bytes(compress=compress))
        publish_dir(staging, directory)
    except OSError as exc:
        raise describe_os_error(exc, "building the initramfs") from exc
    return directory / name
