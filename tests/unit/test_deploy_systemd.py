"""deploy/systemd/pclited.service: systemd's own verifier and security analyzer, plus what the unit must promise.

`systemd-analyze verify` parses the unit as systemd would (an unknown key or a bad value is a warning on stderr, so
the test wants stderr empty); `systemd-analyze security --offline` scores its sandbox. ExecStart is pointed at this
venv's pclited for the check, since /opt/pclite does not exist here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "pclited.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def directives(text: str | None = None) -> dict[str, list[str]]:
    """`Key=value` lines of the [Service] section; keys may repeat."""
    found: dict[str, list[str]] = {}
    section = None
    for raw in (text or UNIT.read_text()).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    unit = tmp_path / "pclited.service"
    pclited = Path(sys.executable).with_name("pclited")
    unit.write_text((text or UNIT.read_text()).replace("/opt/pclite/venv/bin/pclited", str(pclited)))
    return unit


def test_hardening_and_kvm_access():
    d = directives()
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "DevicePolicy": "closed", "DeviceAllow": "/dev/kvm rw", "StateDirectory": "pclite", "User": "root",
        "SupplementaryGroups": "kvm", "RestrictSUIDSGID": "yes", "AmbientCapabilities": "",
        "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes", "ProtectControlGroups": "no",
        "RestrictNamespaces": "mnt pid net ipc uts", "LockPersonality": "yes", "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], f"{key}={d.get(key)}"
    # Root for the VMM jail (a uid per VMM), with exactly the capabilities it needs: no user namespaces, no
    # modules, raw I/O, clock or network administration.
    caps = " ".join(d["CapabilityBoundingSet"]).split()
    assert set(caps) == {"CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_MKNOD",
                         "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_SYS_NICE", "CAP_SYS_PTRACE"}, caps
    assert "DynamicUser" not in d
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert d["ExecStart"][0].endswith("/pclited serve")


def test_paths_match_the_directories_systemd_creates():
    d = directives()
    env = dict(item.split("=", 1) for item in d["Environment"])
    assert env["PCLITE_DATA_DIR"] == f"/var/lib/{d['StateDirectory'][0]}"
    assert env["PCLITE_RUN_DIR"] == f"/run/{d['RuntimeDirectory'][0]}"
    assert env["PCLITE_CACHE"] == f"/var/cache/{d['CacheDirectory'][0]}"
    from service.core.config import MAX_RUN_DIR_LEN, Settings

    known = {f"PCLITE_{name.upper()}" for name in Settings.model_fields} | {"PCLITE_CACHE"}
    assert set(env) <= known, set(env) - known
    assert len(env["PCLITE_RUN_DIR"]) <= MAX_RUN_DIR_LEN


@needs_systemd
def test_systemd_analyze_verify_is_clean(tmp_path):
    result = subprocess.run(["systemd-analyze", "verify", str(runnable_copy(tmp_path))], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@needs_systemd
def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path):
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictt")
    result = subprocess.run(["systemd-analyze", "verify", str(runnable_copy(tmp_path, broken))], capture_output=True,
                            text=True, timeout=60)
    assert "strictt" in result.stderr


@needs_systemd
def test_security_exposure_is_low(tmp_path):
    # 4.3 with the jail's capabilities (2.x as an unjailed DynamicUser): the jailer must be root-ish, as
    # Firecracker's is, so that every VMM facing a guest runs with none.
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=45",
                             str(runnable_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level for pclited.service" in result.stdout
