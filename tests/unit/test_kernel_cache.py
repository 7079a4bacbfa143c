"""Guest kernel cache keys and the errors a user sees before any build starts."""

import subprocess
import sys
import time

import pytest

from guestbuild.cache import BuildError
from guestbuild.kernel import build as kbuild


def test_key_changes_with_fragment_and_source_version():
    base = kbuild.kernel_cache_key(b"CONFIG_A=y\n", "6.1.1-1")
    assert base == kbuild.kernel_cache_key(b"CONFIG_A=y\n", "6.1.1-1")
    assert base != kbuild.kernel_cache_key(b"CONFIG_A=y\nCONFIG_B=y\n", "6.1.1-1")
    assert base != kbuild.kernel_cache_key(b"CONFIG_A=y\n", "6.1.1-2")


def test_key_follows_the_real_fragment_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path))
    fragment = tmp_path / "frag.config"
    fragment.write_text("CONFIG_SMP=y\n")
    version = kbuild._source_version()
    first = kbuild._kernel_dir(fragment.read_bytes(), version)
    fragment.write_text("CONFIG_SMP=y\nCONFIG_EXT4_FS=y\n")
    assert kbuild._kernel_dir(fragment.read_bytes(), version) != first
    assert kbuild.cached_kernel(fragment) is None  # nothing built under this cache


def test_dropped_options_are_reported():
    final = "CONFIG_SMP=y\n# CONFIG_PVH is not set\nCONFIG_NR_CPUS=8\n"
    wanted = kbuild.wanted_options(b"CONFIG_SMP=y\nCONFIG_PVH=y\nCONFIG_NR_CPUS=32\nCONFIG_ACPI=n\n")
    assert kbuild.check_config(final, wanted) == ["CONFIG_PVH=y (got n)", "CONFIG_NR_CPUS=32 (got 8)"]


def test_real_fragment_asks_for_what_the_issue_needs():
    wanted = kbuild.wanted_options(kbuild.FRAGMENT.read_bytes())
    for option in ("CONFIG_PVH", "CONFIG_KVM_GUEST", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_SERIAL_8250_CONSOLE",
                   "CONFIG_X86_MPPARSE", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_EXT4_FS",
                   "CONFIG_DEVTMPFS", "CONFIG_KERNEL_LZ4", "CONFIG_RD_GZIP", "CONFIG_UNIX", "CONFIG_INET"):
        assert wanted.get(option) == "y", option
    assert wanted["CONFIG_MODULES"] == "n"


def test_cached_build_matches_fragment_and_hits_fast():
    """make test builds the kernel first; a hit must answer in well under a second."""
    assert kbuild.cached_kernel() is not None, "guest kernel not built: run `make kernel` first"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "guestbuild.kernel", "build", "--print-path"],
                         capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    bzimage, vmlinux = out.stdout.split()
    assert bzimage.endswith("/bzImage") and vmlinux.endswith("/vmlinux")
    assert elapsed < 1.0, f"cache hit took {elapsed:.2f}s"
    config = (kbuild.cached_kernel().bzimage.parent / "config").read_text()
    assert kbuild.check_config(config, kbuild.wanted_options(kbuild.FRAGMENT.read_bytes())) == []


def test_non_root_without_source_package_is_told_what_to_do(monkeypatch):
    monkeypatch.setattr(kbuild, "SOURCE_PACKAGE", "pclite-no-such-package")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(BuildError, match="needs the Debian package pclite-no-such-package.*ask an administrator "
                                         "to run `make deps`"):
        kbuild.build_kernel()
