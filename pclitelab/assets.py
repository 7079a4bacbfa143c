"""The lab's own kernel and initramfs: Debian's generic linux-image (for kvm-amd + 9p modules) and busybox-static."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from guestbuild.cache import BuildError, cache_root, content_key, describe_os_error, publish_dir
from guestbuild.initramfs.builder import busybox_applets, busybox_path, read_busybox
from guestbuild.initramfs.cpio import CpioArchive

META_PACKAGE = "linux-image-amd64"
# What the lab needs; their dependencies (e.g. ccp for kvm-amd, netfs/fscache for 9p) are added from .modinfo.
WANTED_MODULES = ["kvm-amd", "virtio_pci", "9pnet_virtio", "9p", "virtio_net"]
LAB_INIT = Path(__file__).with_name("lab_init.sh")
RECIPE_VERSION = "1"


@dataclass(frozen=True)
class LabAssets:
    kernel: Path
    initrd: Path
    package: str


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError:
        raise BuildError(f"{what}: `{cmd[0]}` is not installed (run `make deps` as root)") from None
    if out.returncode != 0:
        raise BuildError(f"{what}: `{' '.join(cmd)}` failed: {out.stderr.strip().splitlines()[-1:] or out.stdout}")
    return out.stdout


def resolve_image_package(meta: str = META_PACKAGE) -> str:
    """linux-image-amd64 → the versioned package it depends on (e.g. linux-image-6.1.0-56-amd64)."""
    out = _run(["apt-cache", "depends", meta], f"finding the kernel package behind {meta}")
    match = re.search(r"Depends: (linux-image-\S+-amd64)", out)
    if not match:
        raise BuildError(f"apt knows no {meta}: run `apt-get update` as root, then retry")
    return match.group(1)


def _download_and_unpack(package: str, into: Path) -> Path:
    """apt-get download + dpkg-deb -x into `into`/tree; returns the tree."""
    _run(["apt-get", "download", package], f"downloading {package}", cwd=into)
    deb = next(into.glob("*.deb"))
    tree = into / "tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)], f"unpacking {deb.name}")
    return tree


STOCK_KERNEL_META = "linux-image-cloud-amd64"


def cached_stock_kernel() -> Path | None:
    """Debian's stock cloud kernel (bzImage) if fetched before; read-only, so safe inside the lab."""
    hits = sorted((cache_root() / "debian-kernels").glob("*/vmlinuz"))
    return hits[-1] if hits else None


def stock_kernel() -> Path:
    """Fetch (once) Debian's stock linux-image-*-cloud-amd64 bzImage: the 'any distro kernel boots' test."""
    if hit := cached_stock_kernel():
        return hit
    package = resolve_image_package(STOCK_KERNEL_META)
    directory = cache_root() / "debian-kernels" / package
    print(f"pclite-lab: fetching {package} for the stock-kernel boot test (once)", flush=True)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(dir=staging) as tmp:
            tree = _download_and_unpack(package, Path(tmp))
            shutil.copyfile(next((tree / "boot").glob("vmlinuz-*")), staging / "vmlinuz")
        publish_dir(staging, directory)
    except OSError as exc:
        raise describe_os_error(exc, "fetching the stock kernel") from exc
    return directory / "vmlinuz"


def _modinfo_depends(ko: bytes) -> list[str]:
    match = re.search(rb"\0depends=([^\0]*)\0", ko)
    return [name for name in match.group(1).decode().split(",") if name] if match else []


def module_load_order(modules_root: Path, wanted: list[str]) -> list[Path]:
    """Every wanted module and its dependencies, dependencies first."""
    index = {ko.name[:-3].replace("-", "_"): ko for ko in modules_root.rglob("*.ko")}
    order: list[Path] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key not in index:
            raise BuildError(f"lab kernel package has no module {name}.ko")
        if index[key] in order or key in visiting:
            return
        visiting.add(key)
        for dep in _modinfo_depends(index[key].read_bytes()):
            visit(dep)
        order.append(index[key])

    for name in wanted:
        visit(name)
    return order


def lab_assets() -> LabAssets:
    """Download (once) and assemble the lab kernel + initramfs under ~/.cache/pclite/lab/<key>/."""
    busybox = read_busybox(busybox_path())
    key = content_key(b"pclite-lab", RECIPE_VERSION, LAB_INIT.read_bytes(), ",".join(WANTED_MODULES), busybox)
    directory = cache_root() / "lab" / key
    if (directory / "package.txt").exists():
        return LabAssets(directory / "vmlinuz", directory / "initrd.gz", (directory / "package.txt").read_text())
    try:
        return _assemble(directory, busybox)
    except OSError as exc:
        raise describe_os_error(exc, "building the lab") from exc


def _assemble(directory: Path, busybox: bytes) -> LabAssets:
    package = resolve_image_package()
    print(f"pclite-lab: fetching {package} for the lab kernel (once)", flush=True)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        tree = _download_and_unpack(package, Path(tmp))
        vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
        modules_root = next((tree / "lib/modules").iterdir())
        order = module_load_order(modules_root, WANTED_MODULES)
        archive = CpioArchive()
        for name in ("proc", "sys", "dev", "results", "host", "tmp"):
            archive.add_dir(name)
        archive.add_char_device("dev/console", 5, 1)
        archive.add_file("bin/busybox", busybox, 0o755)
        for applet in busybox_applets(busybox_path()):
            if applet != "bin/busybox":
                archive.add_symlink(applet, "/bin/busybox")
        for ko in order:
            archive.add_file(f"lib/modules/{ko.name}", ko.read_bytes())
        archive.add_file("etc/lab-modules", "".join(f"{ko.name}\n" for ko in order).encode())
        archive.add_file("init", LAB_INIT.read_bytes(), 0o755)
        (staging / "initrd.gz").write_bytes(archive.to_bytes(compress=True))
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
    (staging / "package.txt").write_text(package)
    publish_dir(staging, directory)
    return LabAssets(directory / "vmlinuz", directory / "initrd.gz", package)
