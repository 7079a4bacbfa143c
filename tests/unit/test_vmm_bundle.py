"""The VMM's modules from one precompiled bundle (hypervisor/bundle.py) and the interpreter VMMs start with
(hypervisor/interpreters.py): real child processes started the way pclited starts VMMs."""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import sys

import pytest

from hypervisor import bundle, interpreters
from hypervisor.launch import vmm_command

PROBE = ("import hypervisor.vm, hypervisor.virtio.blk, guestboot.loader, json\n"
         "def name(x): return x.__name__ if isinstance(x, type) else type(x).__name__\n"
         "print(json.dumps([name(sys.meta_path[0]), name(hypervisor.vm.__spec__.loader), hypervisor.vm.__file__, "
         "hypervisor.__path__, guestboot.loader.__file__]))")


def probe(env: dict | None = None) -> list:
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        cmd = vmm_command([])
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    code = cmd[4].split("from hypervisor.__main__")[0] + PROBE
    out = subprocess.run([*cmd[:4], code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_vmm_imports_its_modules_from_the_bundle_with_their_real_file_names():
    finder, loader, vm_file, package_path, loader_file = probe()
    assert finder == loader == "BundleFinder"
    assert vm_file == os.path.join(bundle.ROOT, "hypervisor", "vm.py")  # data files next to modules still resolve
    assert package_path == [os.path.join(bundle.ROOT, "hypervisor")]
    assert loader_file == os.path.join(bundle.ROOT, "guestboot", "loader.py")


def test_without_the_bundle_the_vmm_imports_from_its_sources():
    finder, loader, vm_file, *_ = probe({"PCLITE_VMM_BUNDLE": "0"})
    assert loader == "SourceFileLoader" and vm_file.endswith("hypervisor/vm.py")


def test_a_changed_source_makes_a_new_bundle(tmp_path):
    sources = [("pkg", str(tmp_path / "__init__.py"), True), ("pkg.mod", str(tmp_path / "mod.py"), False)]
    for _, path, _ in sources:
        with open(path, "w") as f:
            f.write("X = 1\n")
    first = bundle.fingerprint(sources)
    assert bundle.fingerprint(sources) == first
    os.utime(sources[1][1], ns=(1, 1))
    assert bundle.fingerprint(sources) != first
    assert bundle.bundle_path().endswith(f"{bundle.fingerprint(bundle._sources())}.bundle")  # the live tree's


def test_a_bundle_for_another_interpreter_or_unreadable_is_ignored(tmp_path):
    sources = [("hypervisor", os.path.join(bundle.ROOT, "hypervisor", "__init__.py"), True)]
    path = tmp_path / "b.bundle"
    bundle.build(str(path), sources)
    fmt, magic, finder, modules = marshal.loads(path.read_bytes())
    path.write_bytes(marshal.dumps((fmt, b"\0\0\r\n", finder, modules)))  # another bytecode version
    for target in (path, tmp_path / "missing.bundle"):
        code = (bundle.CHILD_LOADER.format(path=str(target), format=bundle.FORMAT) +
                f"import sys; sys.path.insert(0, {bundle.ROOT!r}); import hypervisor; "
                "print(type(hypervisor.__spec__.loader).__name__)")
        out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "SourceFileLoader", out.stderr


def test_the_vmm_interpreter_is_chosen_once_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path))
    monkeypatch.delenv("PCLITE_VMM_PYTHON", raising=False)
    monkeypatch.setattr(interpreters, "_chosen", [])
    chosen = interpreters.vmm_python()
    assert chosen in interpreters.candidates()
    record = json.loads((tmp_path / "vmm-python.json").read_text())
    assert record["python"] == chosen and record["key"][0] == list(os.uname())
    assert record["key"][1][0] == os.path.realpath(sys.executable)
    monkeypatch.setattr(interpreters, "_chosen", [])
    monkeypatch.setattr(interpreters, "quickest_python", lambda *a: pytest.fail("measured again"))
    assert interpreters.vmm_python() == chosen  # from the record
    monkeypatch.setenv("PCLITE_VMM_PYTHON", "/opt/python")
    assert interpreters.vmm_python() == "/opt/python"


def test_an_interpreter_of_another_version_is_not_a_candidate(tmp_path):
    other = tmp_path / "python3"
    other.write_text("#!/bin/sh\nexit 1\n")  # what `sys.exit(version mismatch)` looks like from outside
    other.chmod(0o755)
    assert interpreters.start_s(str(other)) is None
    assert interpreters.start_s(sys.executable, f"sys.version_info[:2] != {tuple(sys.version_info[:2])}") > 0
