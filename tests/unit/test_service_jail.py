"""pclited's side of the VMM jail (service/services/jail.py): the plan it makes from a RunSpec, uid slots, what it
reports when a part is off. The jail itself is tests/unit/test_jail.py (host) and tests/guest/test_jail.py (lab)."""

from __future__ import annotations

import json
import os

import pytest

from hypervisor.jail import JailPlan
from hypervisor.runspec import RunSpec
from service.core.config import Settings
from service.services.jail import JailService

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the jail plans uids and chowns as root")


def settings(tmp_path, **extra) -> Settings:
    return Settings(data_dir=tmp_path / "data", run_dir=tmp_path / "run", **{"jail": None, **extra})  # on as root


@root_only
def test_a_plan_holds_the_vms_files_its_own_socket_dir_and_a_free_uid(tmp_path):
    s = settings(tmp_path, jail_cgroup=tmp_path / "no-cgroup-here")
    s.run_dir.mkdir(parents=True)
    jails = JailService(s)
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    plans, uids = [], set()
    for vm_id in ("vm-a", "vm-b"):
        cwd = s.vm_dir / vm_id
        cwd.mkdir(parents=True)
        spec = RunSpec("run", kernel=str(kernel), initrd=str(initrd), mem_mib=128, vcpus=2,
                       api_sock=str(s.run_dir / f"{vm_id}.sock"), console=str(cwd / "console.log"), detach=True)
        plan = JailPlan.from_json(jails.plan(spec, cwd))
        plans.append(plan)
        uids.add(plan.uid)
        assert set(plan.read_only) == {str(kernel), str(initrd)} and plan.read_write == (str(cwd),)
        assert plan.binds == ((str(cwd / "sock"), str(s.run_dir)),)  # its own directory where the socket goes
        assert os.readlink(spec.api_sock) == str(cwd / "sock" / f"{vm_id}.sock")
        assert plan.memory_max == (128 + s.jail_vmm_overhead_mib) << 20 and plan.cgroup is None  # cgroup: off here
        assert s.jail_uid_base <= plan.uid < s.jail_uid_base + s.jail_uid_count
    assert len(uids) == 2  # one per live VM
    jails.release(s.vm_dir / "vm-a")
    clone = RunSpec("restore", snapshot=str(tmp_path), api_sock=str(s.run_dir / "c.sock"))
    again = JailPlan.from_json(jails.plan(clone, s.vm_dir / "vm-c", mem_mib=64))
    assert again.uid == plans[0].uid  # freed by the release, taken again
    assert again.read_only == (str(tmp_path),) and again.memory_max == (64 + s.jail_vmm_overhead_mib) << 20


def test_off_is_said_and_every_feature_reported(tmp_path, caplog):
    jails = JailService(settings(tmp_path, jail=False))
    assert not jails.enabled
    status = jails.status()
    assert set(status) == {"uid", "mountns", "pidns", "netns", "cgroup", "seccomp"}
    assert all(value == "off: jail: false in the settings" for value in status.values()), status
    assert "VMM jail: off" in caplog.text
    assert jails.plan(RunSpec("run", kernel="/k"), tmp_path) is None
    json.dumps(status)
