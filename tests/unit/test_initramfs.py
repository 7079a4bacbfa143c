"""The cpio writer and the initramfs builder, checked against the real `cpio` tool and real busybox."""

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from guestbuild.cache import BuildError
from guestbuild.initramfs.builder import build_initramfs
from guestbuild.initramfs.cpio import CpioArchive


def _sample() -> CpioArchive:
    archive = CpioArchive()
    archive.add_file("etc/motd", b"hello\n")
    archive.add_file("bin/tool", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    archive.add_symlink("bin/sh", "/bin/busybox")
    archive.add_dir("empty", 0o700)
    archive.add_file("odd", b"x" * 5)  # data length not a multiple of 4
    return archive


def _extract(data: bytes, into: Path) -> None:
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=into, check=True)


def test_cpio_round_trip_through_real_cpio(tmp_path):
    _extract(_sample().to_bytes(), tmp_path)
    assert (tmp_path / "etc/motd").read_bytes() == b"hello\n"
    assert (tmp_path / "bin/tool").read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert stat.S_IMODE((tmp_path / "bin/tool").stat().st_mode) == 0o755
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"
    assert (tmp_path / "empty").is_dir() and stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o700
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=_sample().to_bytes(), capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == sorted(listing) == _sample().paths()


def test_cpio_is_byte_for_byte_reproducible_and_gzip_too():
    assert _sample().to_bytes() == _sample().to_bytes()
    assert _sample().to_bytes(compress=True) == _sample().to_bytes(compress=True)
    assert gzip.decompress(_sample().to_bytes(compress=True)) == _sample().to_bytes()


def test_cpio_repack_of_extracted_tree_matches(tmp_path):
    """Extract with cpio, re-read every file, rebuild: the same bytes come out (no hidden state in the writer)."""
    original = _sample().to_bytes()
    _extract(original, tmp_path)
    rebuilt = CpioArchive()
    for path in sorted(p for p in tmp_path.rglob("*")):
        rel = str(path.relative_to(tmp_path))
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            rebuilt.add_symlink(rel, os.readlink(path))
        elif stat.S_ISDIR(mode):
            rebuilt.add_dir(rel, stat.S_IMODE(mode))
        else:
            rebuilt.add_file(rel, path.read_bytes(), stat.S_IMODE(mode))
    assert rebuilt.to_bytes() == original


def test_cpio_rejects_bad_paths():
    archive = CpioArchive()
    for bad in ("", "../escape", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            archive.add_file(bad, b"")
    archive.add_file("f", b"")
    with pytest.raises(ValueError, match="is a file"):
        archive.add_file("f/g", b"")


def test_initramfs_has_busybox_applets_and_init(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path / "cache"))
    path = build_initramfs()
    assert path.is_relative_to(tmp_path / "cache")
    out = tmp_path / "root"
    out.mkdir()
    _extract(gzip.decompress(path.read_bytes()), out)
    assert os.access(out / "init", os.X_OK)
    assert b"pclite-init: ready cpus=" in (out / "init").read_bytes()
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    assert os.readlink(out / "sbin/devmem") == "/bin/busybox" or os.readlink(out / "bin/devmem") == "/bin/busybox"
    assert stat.S_ISCHR((out / "dev/console").lstat().st_mode) or os.geteuid() != 0
    # a second build is a cache hit with the same bytes
    again = build_initramfs()
    assert again == path


def test_missing_busybox_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path))
    monkeypatch.setenv("PCLITE_BUSYBOX", str(tmp_path / "nope"))
    with pytest.raises(BuildError, match="busybox not found at .*install the Debian package busybox-static"):
        build_initramfs()


def test_dynamic_busybox_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path))
    monkeypatch.setenv("PCLITE_BUSYBOX", shutil.which("python3"))
    with pytest.raises(BuildError, match="not a static x86_64 busybox"):
        build_initramfs()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs to fill needs root (CI runs as root)")
def test_disk_full_cache_is_one_clear_error(tmp_path, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        monkeypatch.setenv("PCLITE_CACHE", str(full))
        with pytest.raises(BuildError, match="no space left on device .*free some disk or set PCLITE_CACHE"):
            build_initramfs()
    finally:
        subprocess.run(["umount", str(full)], check=True)
