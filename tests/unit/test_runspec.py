"""RunSpec (hypervisor/runspec.py): one typed description of a VM, the same from the CLI, JSON and pclited."""

from __future__ import annotations

import json

import pytest

from guestboot.loader import BOOT_MODES
from hypervisor.cli_args import UsageError
from hypervisor.runspec import Drive, HostFile, RunSpec

BOOT = RunSpec("run", kernel="/k/vmlinux", initrd="/k/initrd", cmdline="console=ttyS0 quiet", mem_mib=512, vcpus=2,
               boot="pvh", console="/vm/console.log", api_sock="/run/vm-1.sock", detach=True, timeline=True,
               drives=(Drive("rootfs", "/vm/rootfs.ext4", read_only=True),))
CLONE = RunSpec("restore", snapshot="/t/snap", hostname="vm-2", api_sock="/run/vm-2.sock", console="none")


@pytest.mark.parametrize("spec", [BOOT, CLONE, RunSpec("run", kernel="k"), RunSpec("restore", snapshot="s")])
def test_argv_and_json_round_trip(spec):
    assert RunSpec.from_argv(spec.to_argv()) == spec
    assert RunSpec.from_json(spec.to_json()) == spec
    assert RunSpec.from_json(json.loads(spec.to_json())) == spec
    assert hash(RunSpec.from_json(spec.to_json())) == hash(spec)


def test_argv_keeps_what_proc_scans_look_for():
    argv = BOOT.to_argv()
    assert argv[0] == "run" and argv[argv.index("--api-sock") + 1] == "/run/vm-1.sock"


def test_frozen_and_replace():
    with pytest.raises(AttributeError, match="frozen"):
        BOOT.mem_mib = 1
    bigger = BOOT.replace(mem_mib=1024)
    assert bigger.mem_mib == 1024 and BOOT.mem_mib == 512 and bigger != BOOT
    assert bigger.images_key() != BOOT.images_key() and BOOT.replace(api_sock="/x").images_key() == BOOT.images_key()


def test_boot_modes_are_the_loaders():
    for mode in BOOT_MODES:
        assert RunSpec("run", kernel="k", boot=mode).boot == mode
    with pytest.raises(UsageError, match="--boot must be one of auto, pvh"):
        RunSpec.from_argv(["run", "--kernel", "k", "--boot", "bios"])


@pytest.mark.parametrize("data, message", [
    ("[]", "must be a JSON object"), ("{", "must be JSON"), ({"command": "exec"}, "command must be"),
    ({"command": "run"}, "kernel must be str"), ({"command": "run", "kernel": "k", "vcpus": True}, "vcpus must be int"),
    ({"command": "run", "kernel": "k", "mem_mib": 1.5}, "mem_mib must be int"),
    ({"command": "run", "kernel": "k", "snapshot": "s"}, "no field(s) 'snapshot'"),
    ({"command": "restore", "snapshot": "s", "kernel": "k"}, "no field(s) 'kernel'"),
    ({"command": "run", "kernel": "k\0"}, "NUL"),
    ({"command": "run", "kernel": "k", "drives": [{"slot": "swap", "path": "x"}]}, "drive slot"),
    ({"command": "run", "kernel": "k", "drives": [{"slot": "rootfs", "path": 3}]}, "drive path must be str"),
    ({"command": "run", "kernel": "k", "drives": {"slot": "rootfs"}}, "drives must be a list"),
    ("x" * (65 << 10), "at most"),
])
def test_from_json_refuses_anything_else_with_one_line(data, message):
    with pytest.raises(UsageError, match=None) as error:
        RunSpec.from_json(data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_host_files_list_everything_the_vmm_touches():
    files = {(f.what, f.path): f for f in BOOT.host_files()}
    assert files["kernel", "/k/vmlinux"] == HostFile("/k/vmlinux", "kernel")
    assert not files["initrd", "/k/initrd"].writable
    assert files["drive:rootfs", "/vm/rootfs.ext4"].writable is False
    assert files["console", "/vm/console.log"].writable
    assert files["api-socket-dir", "/run"].is_dir and files["api-socket-dir", "/run"].writable
    assert ("kvm", "/dev/kvm") in files
    clone = {f.what: f for f in CLONE.host_files()}
    assert clone["snapshot"] == HostFile("/t/snap", "snapshot", is_dir=True) and "console" not in clone
    unpack = {f.what for f in RunSpec("run", kernel="k", boot="unpack").host_files()}
    assert "unpacked-kernel-cache" in unpack


def test_one_builder_and_no_argv_patching():
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    for caller in ("hypervisor/__main__.py", "hypervisor/forkserver.py"):  # the CLI and the fork server's children
        assert "from hypervisor.builder import run" in (root / caller).read_text(), caller
    for path in [*root.glob("hypervisor/**/*.py"), *root.glob("service/**/*.py")]:
        text = path.read_text()
        assert not re.search(r"\[\s*\w+\.index\(\"--[\w-]+\"\)\s*\+\s*1\s*\]\s*=", text), f"argv patched in {path}"
        if path.parts[-2] == "hypervisor" or "hypervisor" in path.parts:
            assert '.index("--' not in text, f"argv looked up by index in {path}"
        assert "TIMELINE" not in text, f"a module-level timeline in {path}: pass one"


def test_pclited_launcher_builds_specs_from_the_vm_row(tmp_path):
    from service.core.config import Settings
    from service.models import CLONE, COLD, VM, Flavor
    from service.services.vmm import Launcher
    launcher = Launcher(Settings(data_dir=tmp_path, database_url="sqlite://", vmm_detach=True))
    flavor = Flavor(name="f", kernel="/k/vmlinux", initrd="/k/initrd", cmdline_extra="x=1", vcpus=1, mem_mib=256)
    cold = VM(id="vm-1", source=COLD, vcpus=2, mem_mib=512, api_socket=str(tmp_path / "run/vm-1.sock"),
              console_path=str(tmp_path / "vm-1/console.log"))
    spec = launcher.vm_spec(cold, flavor)
    assert (spec.command, spec.kernel, spec.mem_mib, spec.vcpus, spec.detach) == ("run", "/k/vmlinux", 512, 2, True)
    assert spec.cmdline.endswith("pclite.mode=agent x=1") and spec.timeline
    argv = spec.to_argv()  # a fresh VMM's command line: what the /proc scans look for
    assert argv[argv.index("--api-sock") + 1] == cold.api_socket and RunSpec.from_argv(argv) == spec
    clone = VM(id="vm-2", source=CLONE, template="f-abc", vcpus=1, mem_mib=256, api_socket="/r/vm-2.sock",
               console_path="/d/console.log")
    spec = launcher.vm_spec(clone, flavor)
    assert (spec.command, spec.snapshot, spec.hostname) == ("restore", str(launcher.settings.templates_dir / "f-abc"),
                                                            "vm-2")
