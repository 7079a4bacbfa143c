"""The VMM's start-up path stays lean: the launcher's command line, the imports it pays for, kernel copy-in."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from guestboot.layout import CMDLINE_ADDR
from guestboot.plan import LoaderError, Segment
from hypervisor.boot_images import BootImages, kernel_cmdline
from hypervisor.image_file import ImageFile, load_segments
from hypervisor.interpreters import vmm_python
from hypervisor.launch import vmm_command
from hypervisor.memory import GuestMemory

# Modules whose import (with their own imports, or class creation) costs whole tenths of a second of VMM start-up
# in the lab; the `run` path must not pull any of them in before the first KVM_RUN.
HEAVY = {"dataclasses", "inspect", "enum", "signal", "logging", "typing", "re", "pathlib", "subprocess", "queue",
         "contextlib", "weakref", "tempfile", "shutil", "hashlib", "ast", "tokenize", "site"}
RUN_PATH = ("hypervisor.__main__", "hypervisor.builder", "hypervisor.runspec", "hypervisor.vm",
            "hypervisor.agent_channel", "hypervisor.virtio.mmio", "hypervisor.virtio.console", "hypervisor.virtio.rng",
            "hypervisor.virtio.blk")


def test_launcher_starts_the_vmm_from_anywhere_without_site(tmp_path):
    cmd = vmm_command(["run", "--kernel", str(tmp_path / "missing")])
    assert cmd[:3] == [vmm_python(), "-S", "-P"] and "hypervisor" in cmd  # /proc scans look for that element
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and "kernel" in out.stderr and "does not exist" in out.stderr, out.stderr


def test_run_path_imports_nothing_heavy(tmp_path):
    probe = "import sys; print(' '.join(sorted(sys.modules)))"
    cmd = vmm_command([])
    bootstrap = cmd[4].split("from hypervisor.__main__")[0]  # the launcher's sys.path set-up, then the probe
    code = bootstrap + "; ".join(f"import {name}" for name in RUN_PATH) + "; " + probe
    out = subprocess.run([*cmd[:4], code], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    loaded = set(out.stdout.split())
    assert set(RUN_PATH) <= loaded
    assert not loaded & HEAVY, f"the VMM start-up path imports {sorted(loaded & HEAVY)}"


def test_segments_that_slice_an_image_are_read_from_its_file(tmp_path):
    blob = bytes(range(256)) * 64
    path = tmp_path / "image"
    path.write_bytes(blob)
    image = ImageFile(str(path))
    try:
        piece = image.view[1000:9000]
        assert image.offset_of(piece) == 1000
        assert image.offset_of(bytes(piece)) is None and image.offset_of(image.view[5:5]) is None
        memory = GuestMemory(4 << 20)
        load_segments(memory, [Segment(0x10000, piece, "kernel"), Segment(0x100, b"abc", "cmdline")], [image])
        assert memory.read(0x10000, 8000) == blob[1000:9000] and memory.read(0x100, 3) == b"abc"
    finally:
        image.close()


def test_an_empty_image_maps_to_an_empty_view(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    image = ImageFile(str(path))
    assert len(image.view) == 0 and image.offset_of(image.view) is None
    image.close()
    image.close()  # idempotent


def test_boot_images_load_in_the_background_what_plan_boot_places(images, tmp_path):
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(images.elf())
    initrd.write_bytes(b"\x07" * 5000)
    loading = BootImages(str(kernel), str(initrd), kernel_cmdline("console=ttyS0"), 64 << 20, 2, "auto")
    plan, memory = loading.result(), loading.memory
    cmdline = memory.read(CMDLINE_ADDR, 256).split(b"\0")[0].decode()
    assert plan.kernel_format == "elf-pvh" and cmdline.startswith("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5")
    for segment in plan.segments:
        assert memory.read(segment.gpa, len(segment.data)) == bytes(segment.data), segment.what


def test_boot_images_hand_their_error_to_result(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(8192))
    with pytest.raises(LoaderError, match="not a bzImage"):
        BootImages(str(junk), None, "", 64 << 20, 1, "auto").result()
    with pytest.raises(FileNotFoundError):
        BootImages(str(tmp_path / "missing"), None, "", 64 << 20, 1, "auto").result()
    unmappable = BootImages(str(junk), None, "", -1, 1, "auto")
    assert unmappable.memory is None
    with pytest.raises((OSError, ValueError, OverflowError)):
        unmappable.result()


def test_a_host_unpacked_bzimage_is_kept_for_the_next_vm(images, tmp_path, monkeypatch):
    import threading

    from hypervisor.boot_images import unpacked_cache_file
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path / "cache"))
    kernel = tmp_path / "bzImage"
    vmlinux = images.elf()
    kernel.write_bytes(images.bzimage(vmlinux, compression="lz4"))

    def boot():
        loading = BootImages(str(kernel), None, "console=ttyS0", 64 << 20, 1, "unpack")
        plan = loading.result()
        for thread in threading.enumerate():
            if thread.name == "keep-unpacked":
                thread.join()
        for segment in plan.segments:
            assert loading.memory.read(segment.gpa, len(segment.data)) == bytes(segment.data), segment.what
        return plan
    first = boot()
    kept = unpacked_cache_file(str(kernel))
    assert first.kernel_format == "bzImage-unpacked" and not first.details["unpacked_before"]
    assert Path(kept).read_bytes() == vmlinux
    second = boot()
    assert second.kernel_format == "bzImage-unpacked" and second.details["unpacked_before"]
    assert [bytes(s.data) for s in second.segments] == [bytes(s.data) for s in first.segments]
    with open(kept, "r+b") as damaged:
        damaged.write(b"junk")  # not an ELF any more: unpacked afresh, and kept again
    third = boot()
    assert not third.details["unpacked_before"] and "fallback" not in third.details
    assert Path(kept).read_bytes() == vmlinux
    kernel.write_bytes(images.bzimage(vmlinux, compression="gzip"))  # a new kernel at the same path
    os.utime(kernel, ns=(1, 1))
    assert not boot().details["unpacked_before"]
    assert os.listdir(os.path.dirname(kept)) == [os.path.basename(unpacked_cache_file(str(kernel)))]  # old one gone


def test_images_prepared_ahead_serve_only_the_same_request_on_unchanged_files(images, tmp_path):
    from hypervisor import boot_images
    from hypervisor.runspec import RunSpec
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(images.elf())
    spec = RunSpec("run", kernel=str(kernel), cmdline="console=ttyS0", mem_mib=64)
    boot_images.prepare(spec)
    prepared = boot_images.take_prepared(spec.replace(api_sock="/elsewhere.sock", console="none"))  # not loaded
    assert prepared is not None and prepared.result().kernel_format == "elf-pvh"
    assert boot_images.take_prepared(spec) is None  # once
    boot_images.prepare(spec)
    assert boot_images.take_prepared(spec.replace(mem_mib=128)) is None  # another size: freed, not used
    boot_images.prepare(spec)
    os.utime(kernel, ns=(1, 1))  # the kernel changed since
    assert boot_images.take_prepared(spec) is None and boot_images._PREPARED == []
