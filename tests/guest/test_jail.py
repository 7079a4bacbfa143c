"""Every VMM pclited starts is jailed (hypervisor/jail.py, service/services/jail.py): checked from outside on a real
pclited running as root in the lab, for a pooled cold-boot VM and a clone (one pclited, the VMs shared by the checks).

Per VMM: no_new_privs, no capabilities, a uid from the jail range that is neither pclited's nor the other VM's, its
own mount/pid/net namespaces, its own cgroup leaf with memory.max, and a mount namespace in which pclited's data dir
contents (token, database), the other VM's directory and socket do not exist while its own socket does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.guest.test_service_pool import exec_in, metric
from tests.support.servers import running_pclited

STEP_S = 120.0
# Read in two lab runs with --runxfail: once the jailed VMs came up (and pclited stored the namespace's pid 1 as their
# pid, since fixed), once the first jailed VMM took 76 s to start and no guest printed a line in 4 minutes. The jail
# stays opt-in until these pass.
NOT_READY_YET = pytest.mark.xfail(run=False, reason="issue 12: jailed pool VMs do not come up reliably in the lab "
                                  "(no console output); the jail is opt-in until these pass")
SETTINGS = {"jail": True, "boot_concurrency": 2, "pool_tick_s": 0.2, "supervise_interval_s": 0.1,
            "health_interval_s": 5, "boot_timeout_s": 90, "stop_timeout_s": 5, "template_backoff_s": 2}
UID_BASE, UID_COUNT, OVERHEAD_MIB = 200000, 4096, 256  # the settings' defaults
MEM_MIB = 128


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.fixture(scope="module")
def service():
    with running_pclited(start_timeout_s=600, **SETTINGS) as svc:  # a lab on a busy host starts slowly
        yield svc


@pytest.fixture(scope="module")
def vms(service):
    """{"cold": vm, "clone": vm}: a pooled cold boot and a pooled clone, both ready."""
    with service.client(timeout=STEP_S) as api:
        for name, clone in (("cold", False), ("cl", True)):
            created = api.post("/v1/flavors", json={"name": name, "mem_mib": MEM_MIB, "pool_target": 1, "clone": clone})
            assert created.status_code == 201, created.text
        found = {}

        def ready() -> bool:
            for flavor, label in (("cold", "cold"), ("cl", "clone")):
                for vm in api.get("/v1/vms", params={"flavor": flavor, "state": "ready"}).json():
                    if vm["source"] == ("clone" if label == "clone" else "cold"):
                        found[label] = vm
            return len(found) == 2
        service.wait_for(ready, 2 * STEP_S, message="a ready cold VM and a ready clone")
        return found


def test_readyz_and_metrics_say_what_is_jailed(service):
    import httpx
    body = httpx.get(f"{service.url}/readyz", timeout=10).json()
    assert set(body["jail"]) == {"uid", "mountns", "pidns", "netns", "cgroup", "seccomp"}, body
    for feature in ("uid", "mountns", "pidns", "netns", "cgroup"):  # root in the lab, cgroup v2 mounted
        assert body["jail"][feature] == "on", body
    with service.client() as api:
        for feature, state in body["jail"].items():
            assert metric(api, "pclite_jail_enabled", feature=feature) == (1 if state == "on" else 0)


@NOT_READY_YET
def test_vmms_run_unprivileged_in_their_own_namespaces_and_cgroups(service, vms):
    pclited = service.proc.pid
    uids = {}
    for label, vm in vms.items():
        pid = vm["pid"]
        st = status(pid)
        uid = int(st["Uid"].split()[0])
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4, (label, st["Uid"])
        assert UID_BASE <= uid < UID_BASE + UID_COUNT and uid != os.geteuid(), (label, uid)
        assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (label, st)
        seccomp_on = httpx_ready(service)["jail"]["seccomp"] == "on"
        assert st["Seccomp"] == ("2" if seccomp_on else "0"), (label, st["Seccomp"])
        uids[label] = uid
        for kind in ("mnt", "pid", "net", "ipc", "uts"):
            assert ns(pid, kind) != ns(pclited, kind), (label, kind)
        assert st["NSpid"].split()[-1] == "1", (label, st["NSpid"])  # pid 1 of its own pid namespace
        vm_dir = service.data_dir / "vms" / vm["id"]
        with open(f"/proc/{pid}/cgroup") as f:
            cgroup = f.read().strip()
        assert cgroup == f"0::/pclite/{vm_dir.name}", (label, cgroup)
        with open(f"/sys/fs/cgroup/pclite/{vm_dir.name}/memory.max") as f:
            assert int(f.read()) == (MEM_MIB + OVERHEAD_MIB) << 20, label
        with open(f"/sys/fs/cgroup/pclite/{vm_dir.name}/pids.max") as f:
            assert int(f.read()) > 0, label
        with service.client() as api:  # and it still works
            assert exec_in(api, vm["id"], ["echo", "jailed"])["stdout"] == b"jailed\n"
    assert uids["cold"] != uids["clone"], uids


@NOT_READY_YET
def test_inside_a_jail_pclited_and_other_vms_do_not_exist(service, vms):
    data = service.data_dir
    for label, vm in vms.items():
        other = vms["clone" if label == "cold" else "cold"]
        root = f"/proc/{vm['pid']}/root"
        own_dir = data / "vms" / vm["id"]
        assert os.path.exists(root + vm["api_socket"]), label  # its own socket, where pclited connects
        assert os.path.exists(root + str(own_dir / "console.log")), label
        for absent in (data / "token", data / "pclite.db", data / "pclited.log", Path(other["api_socket"]),
                       data / "vms" / other["id"], Path("/etc"), Path("/home")):
            assert not os.path.exists(root + str(absent)), (label, str(absent))
        with open(f"/proc/{vm['pid']}/mounts") as f:
            mounts = f.read()
        assert str(data / "token") not in mounts and " / tmpfs ro," in mounts, (label, mounts)


@NOT_READY_YET
def test_a_container_rootfs_is_handed_to_the_jailed_vmm(service, vms):
    """The container path: a claimed clone gets a rootfs from a tar stream; its image belongs to the VM's uid, which
    its jailed VMM opens it as, and the guest mounts it."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    with service.client(timeout=STEP_S) as api:
        claimed = api.post("/v1/vms", json={"flavor": "cl", "wait": True}).json()
        assert claimed["claim"] == "hit" and claimed["id"] == vms["clone"]["id"], claimed
        attached = api.post(f"/v1/vms/{claimed['id']}/rootfs", content=buffer.getvalue(),
                            headers={"Content-Type": "application/x-tar"})
        assert attached.status_code == 200, attached.text
        image = service.data_dir / "vms" / claimed["id"] / "rootfs.ext4"
        assert image.stat().st_uid == int(status(claimed["pid"])["Uid"].split()[0])
        assert exec_in(api, claimed["id"], ["cat", "/rootfs/hello"])["stdout"] == b"hi\n"


@NOT_READY_YET
def test_a_stopped_vm_leaves_no_cgroup(service, vms):
    vm = vms["cold"]
    leaf = f"/sys/fs/cgroup/pclite/{vm['id']}"
    assert os.path.isdir(leaf)
    with service.client(timeout=STEP_S) as api:
        api.patch("/v1/pools/cold", json={"target": 0})
        assert api.delete(f"/v1/vms/{vm['id']}", params={"wait": "true"}).status_code in (200, 202, 204)
    service.wait_for(lambda: not os.path.exists(leaf), 20, message=f"{leaf} to be removed")
    assert not os.path.islink(vm["api_socket"]) and not os.path.exists(vm["api_socket"])


def httpx_ready(service) -> dict:
    import httpx
    return httpx.get(f"{service.url}/readyz", timeout=10).json()
