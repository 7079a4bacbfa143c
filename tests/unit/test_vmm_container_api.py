"""The VMM's container routes over a real Unix socket, no KVM: PUT /drives/rootfs swaps a real virtio-blk device's
backing (driven by the test's virtio driver) and waits for the guest's view of the size; interactive processes run
in the real agent (`--stdio`, on the host) through the Controller and VmmClient."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest

from hypervisor import control
from hypervisor.api_server import ApiServer
from hypervisor.client import VmmClient, VmmError
from hypervisor.control import Controller
from hypervisor.virtio import mmio as m
from hypervisor.virtio.blk import BlockDevice
from tests.unit.test_virtio_driver import VirtioDriver
from tests.unit.test_vmm_agent_api import PipeAgent


@pytest.fixture
def vmm(tmp_path, monkeypatch):
    """(client, driver of the rootfs disk, the file standing for the guest's /sys/block/vda/size)."""
    size_file = tmp_path / "vda-size"
    size_file.write_text("0\n")
    monkeypatch.setattr(control, "GUEST_DISK_SIZE", str(size_file))
    driver = VirtioDriver(BlockDevice("/dev/null"))
    driver.negotiate()
    driver.w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK)
    pipe = PipeAgent()
    assert pipe.channel.ready.wait(10)
    machine = SimpleNamespace(rootfs=driver.device)
    server = ApiServer(str(tmp_path / "vmm.sock"), Controller(machine, pipe.channel, lambda n: b""))
    server.serve_in_background()
    yield VmmClient(server.path), driver, size_file
    server.close()
    pipe.close()


def image(tmp_path, sectors: int):
    path = tmp_path / f"disk-{sectors}.img"
    path.write_bytes(b"\0" * 512 * sectors)
    return str(path)


def test_swap_waits_until_the_guest_sees_the_new_size(vmm, tmp_path):
    client, driver, size_file = vmm
    threading.Timer(0.2, lambda: size_file.write_text("64\n")).start()  # the guest's driver, a little later
    started = time.monotonic()
    reply = client.swap_drive(image(tmp_path, 64))
    assert reply["sectors"] == 64 and reply["guest_sees_it"] and time.monotonic() - started >= 0.15
    assert driver.r(m.CONFIG) == 64 and driver.r(m.CONFIG_GENERATION) == 1
    assert driver.r(m.INTERRUPT_STATUS) & m.INT_CONFIG_CHANGE


def test_swap_to_a_read_only_image_and_back_to_the_placeholder(vmm, tmp_path):
    client, driver, size_file = vmm
    size_file.write_text("8\n")
    assert client.swap_drive(image(tmp_path, 8), read_only=True)["read_only"] is True
    size_file.write_text("0\n")
    reply = client.swap_drive(None)
    assert (reply["sectors"], reply["read_only"], reply["path"]) == (0, False, None)
    assert driver.r(m.CONFIG_GENERATION) == 2


def test_swap_times_out_when_the_guest_never_sees_it(vmm, tmp_path):
    client, _, _ = vmm
    with pytest.raises(VmmError, match="still sees 0 sectors, not 16") as info:
        client.swap_drive(image(tmp_path, 16), wait_s=0.3)
    assert info.value.status == 504


@pytest.mark.parametrize("body, message", [
    ({"path": "relative.img"}, "absolute path"),
    ({"path": "/no/such/image"}, "does not exist"),
    ({"path": None, "wait_s": 1000}, "wait_s"),
])
def test_bad_drive_requests_change_nothing(vmm, body, message):
    client, driver, _ = vmm
    with pytest.raises(VmmError, match=message) as info:
        client._call("PUT", "/drives/rootfs", body)
    assert info.value.status == 400 and driver.r(m.CONFIG_GENERATION) == 0


def test_interactive_process_stdin_stdout_and_exit(vmm):
    client, _, _ = vmm
    process = client.start_process(["sh", "-c", "cat; echo done >&2; exit 3"])
    assert process.exec_id and process.pid
    process.write(b"line one\n")
    process.write(b"line two\n", eof=True)
    events = list(process.events())
    assert b"".join(data for kind, data in events if kind == "stdout") == b"line one\nline two\n"
    assert b"".join(data for kind, data in events if kind == "stderr") == b"done\n"
    assert events[-1][0] == "exit" and events[-1][1].exit_code == 3
    with pytest.raises(VmmError, match="no interactive exec"):
        process.signal(15)  # it has exited: the id is no longer accepted


def test_interactive_process_signal_and_tty_resize(vmm):
    client, _, _ = vmm
    process = client.start_process(["sh", "-c", "read x; stty size; sleep 30"], tty=True, size=[5, 6])
    process.resize(40, 120)
    process.write(b"go\n")
    output = b""
    events = process.events()
    while b"40 120" not in output:
        kind, data = next(events)
        assert kind == "stdout", (kind, data)
        output += data
    process.signal(15)
    exit_result = [data for kind, data in events if kind == "exit"][0]
    assert exit_result.signal == 15


def test_process_that_cannot_start_is_a_clear_error(vmm):
    client, _, _ = vmm
    with pytest.raises(VmmError, match="execve /no/such/program"):
        client.start_process(["/no/such/program"])
    with pytest.raises(VmmError, match="rlimit"):
        client.start_process(["true"], rlimits=[[7, 1]])


def test_a_client_that_goes_away_takes_its_process_along(vmm):
    client, _, _ = vmm
    process = client.start_process(["sleep", "30"])
    pid = process.pid  # --stdio: the "guest" process is a host process here
    process.close()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the process outlived its client"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
