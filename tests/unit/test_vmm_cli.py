"""`python -m hypervisor` as a user runs it: clear one-line errors and no partial VM on bad input."""

import subprocess
import sys

import pytest


def vmm(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "hypervisor", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("args, message", [
    ([], "python -m hypervisor run --kernel"),
    (["run"], "missing --kernel"),
    (["run", "--kernel", "/nonexistent"], "kernel /nonexistent does not exist"),
    (["run", "--kernel", "JUNK", "--vcpus", "0"], "--vcpus must be 1..64"),
    (["run", "--kernel", "JUNK", "--mem", "8"], "--mem must be at least 32 MiB"),
    (["run", "--kernel", "JUNK", "--boot", "bios"], "--boot must be one of auto, pvh, bzimage, unpack"),
    (["run", "--kernel", "JUNK"], "not a bzImage: boot_flag at 0x1FE is 0x0000"),
])
def test_bad_invocations_fail_with_one_clear_line(args, message, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(8192))
    out = vmm(*[str(junk) if arg == "JUNK" else arg for arg in args])
    assert out.returncode in (1, 2)
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_truncated_bzimage_is_refused(tmp_path):
    from guestbuild.kernel import cached_kernel
    kernel = cached_kernel()
    assert kernel is not None, "guest kernel not built: run `make kernel`"
    truncated = tmp_path / "bzImage"
    truncated.write_bytes(kernel.bzimage.read_bytes()[:4096])
    out = vmm("run", "--kernel", str(truncated), "--boot", "bzimage")
    assert out.returncode == 1 and "truncated" in out.stderr.lower(), out.stderr


def test_initrd_too_big_for_ram(tmp_path):
    from guestbuild.kernel import cached_kernel
    kernel = cached_kernel()
    assert kernel is not None, "guest kernel not built: run `make kernel`"
    big = tmp_path / "initrd"
    with open(big, "wb") as f:
        f.truncate(60 << 20)
    out = vmm("run", "--kernel", str(kernel.vmlinux), "--initrd", str(big), "--mem", "64")
    assert out.returncode == 1 and "initrd" in out.stderr and "--mem" in out.stderr, out.stderr


def test_ram_too_small_for_kernel():
    from guestbuild.kernel import cached_kernel
    kernel = cached_kernel()
    assert kernel is not None, "guest kernel not built: run `make kernel`"
    out = vmm("run", "--kernel", str(kernel.vmlinux), "--mem", "32")
    assert out.returncode == 1 and "RAM is too small" in out.stderr and "--mem" in out.stderr, out.stderr
