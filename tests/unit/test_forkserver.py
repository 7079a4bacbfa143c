"""The VMM fork server on the host: a real server process, real forks, real fds; no guest needed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from hypervisor.cli_args import UsageError
from hypervisor.forkserver import ForkServerError, spawn
from hypervisor.launch import vmm_command
from hypervisor.runspec import RunSpec


def _start(tmp_path, *extra):
    path = str(tmp_path / "fork.sock")
    proc = subprocess.Popen(vmm_command(["forkserver", "--socket", path, *extra]), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "fork server never listened"
        time.sleep(0.01)
    return path, proc


def _stop(path, proc):
    proc.terminate()
    assert proc.wait(10) is not None
    assert not os.path.exists(path), "the fork server left its socket behind"


@pytest.fixture
def server(tmp_path):
    path, proc = _start(tmp_path)
    yield path
    _stop(path, proc)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _holds_kvm_vm(pid: int) -> bool:
    fds = f"/proc/{pid}/fd"
    return any(os.readlink(os.path.join(fds, fd)) == "anon_inode:kvm-vm" for fd in os.listdir(fds))


def _warm_child(server_pid: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in _children(server_pid):
            try:
                if _holds_kvm_vm(child):
                    return child
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError("the fork server has no warm VMM (a child holding a KVM VM)")


def _spawn(server, argv):
    read_end, write_end = os.pipe()
    vm = spawn(server, argv, 0, write_end, write_end)
    os.close(write_end)
    return vm, read_end


def _drain(fd) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    os.close(fd)
    return out


def test_forked_vmm_reports_its_error_and_exit_code(server):
    started = time.monotonic()
    vm, out = _spawn(server, ["run", "--kernel", "/nonexistent/vmlinux"])
    assert vm.wait(10) == 1
    assert b"kernel /nonexistent/vmlinux does not exist" in _drain(out)
    assert time.monotonic() - started < 2  # no interpreter start: a fork


def test_many_children_and_options_checked_by_the_caller(server):
    vms = [_spawn(server, RunSpec("run", kernel=f"/nonexistent/{n}")) for n in range(10)]
    assert [vm.wait(10) for vm, _ in vms] == [1] * 10
    assert all(b"does not exist" in _drain(out) for _, out in vms)
    with pytest.raises(UsageError, match="unknown option '--bogus'"):  # CLI options become a spec before the wire
        spawn(server, ["run", "--bogus"], 0, 1, 2)


def test_poll_before_exit_is_none(server, tmp_path):
    vm, out = _spawn(server, ["run", "--kernel", "/nonexistent/vmlinux"])
    assert vm.poll() in (None, 1)
    assert vm.wait(10) == 1 and b"does not exist" in _drain(out)


def _request(server, payload: bytes, fds=()) -> dict:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(server)
        socket.send_fds(conn, [payload], list(fds)) if fds else conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        return json.loads(conn.makefile("rb").readline())


def test_bad_request_is_refused_with_a_reason(server):
    assert "exactly 3 file descriptors" in _request(server, json.dumps({"spec": {}}).encode())["error"]


def _fd_count(pid: int, settled: int | None = None) -> int:
    """Its open fds; `settled`: the count expected once the last refused connection is closed (just after the reply)."""
    deadline = time.monotonic() + 2
    while (count := len(os.listdir(f"/proc/{pid}/fd"))) != settled and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


def test_bad_requests_with_fds_are_refused_and_leave_no_fd_behind(tmp_path):
    path, proc = _start(tmp_path, "--warm", "0")
    good = RunSpec("run", kernel="/nonexistent/vmlinux").as_dict()
    bad = [b"[]", b"42", b"null", b"{not json", b"[" * 100000, b"x" * (70 << 10)] + [json.dumps(r).encode() for r in (
        {"argv": ["run"]}, {"spec": good, "extra": 1}, {"spec": {**good, "mem_mib": "256"}},
        {"spec": {**good, "vcpus": True}}, {"spec": {**good, "kernel": None}}, {"spec": {**good, "snapshot": "/x"}},
        {"spec": {**good, "boot": "bios"}}, {"spec": {**good, "drives": [{"slot": "swap", "path": "/x"}]}},
        {"spec": {**good, "drives": "rootfs"}}, {"spec": good, "t0": "now"}, {"spec": good, "cwd": 7},
        {"spec": {**good, "command": "exec"}}, {"spec": [good]})]
    try:
        time.sleep(0.3)
        before = _fd_count(proc.pid)
        for n in range(100):
            payload = bad[n % len(bad)]
            reply = _request(path, payload[:60 << 10] if n % 2 else payload, [0, 1, 2])
            assert reply["error"].startswith("bad fork request: "), (payload[:80], reply)
            assert "\n" not in reply["error"]
        assert proc.poll() is None and _fd_count(proc.pid, before) == before
        vm, out = _spawn(path, RunSpec("run", kernel="/nonexistent/vmlinux"))  # still serving
        assert vm.wait(10) == 1 and b"does not exist" in _drain(out)
        assert _fd_count(proc.pid, before) == before
    finally:
        _stop(path, proc)


def test_missing_server_says_how_to_start_one(tmp_path):
    with pytest.raises(ForkServerError, match="python -m hypervisor forkserver --socket"):
        spawn(str(tmp_path / "nope.sock"), ["run", "--kernel", "k"], 0, 1, 2)


def test_preloaded_image_is_served_from_memory_until_the_file_changes(tmp_path):
    from hypervisor.image_file import ImageFile, preload
    path = tmp_path / "kernel"
    path.write_bytes(b"A" * 8192)
    assert preload(str(path)) and not preload(str(path))  # kept once: the server freezes its heap only then
    path.write_bytes(b"B" * 8192)  # same size, new mtime: the preloaded copy is stale and must not be used
    os.utime(path, ns=(1, 1))
    image = ImageFile(str(path))
    dest = bytearray(16)
    image.read_into(memoryview(dest), 100)
    assert dest == b"B" * 16
    preload(str(path))
    cached = ImageFile(str(path))
    assert cached.offset_of(cached.view[4096:4100]) == 4096
    dest = bytearray(8)
    cached.read_into(memoryview(dest), 8000)
    assert dest == b"B" * 8 and isinstance(cached._map, bytearray)


@pytest.mark.kvm
def test_requests_go_to_a_warm_vmm_with_its_kvm_vm_made_ahead(tmp_path):
    path, proc = _start(tmp_path)
    try:
        for _ in range(3):  # each request takes the warm one; the next is forked once the server idles
            warm = _warm_child(proc.pid)
            vm, out = _spawn(path, ["run", "--kernel", "/nonexistent/vmlinux"])
            assert vm.pid == warm
            assert vm.wait(10) == 1 and b"kernel /nonexistent/vmlinux does not exist" in _drain(out)
        os.kill(_warm_child(proc.pid), 9)  # a warm VMM that dies unused: requests are forked meanwhile
        time.sleep(0.2)
        vm, out = _spawn(path, ["run", "--kernel", "/nonexistent/other"])
        assert vm.wait(10) == 1 and b"does not exist" in _drain(out)
    finally:
        _stop(path, proc)
    assert b"exited before use" in proc.stderr.read()


def test_without_warm_vmms_nothing_waits_ahead(tmp_path):
    path, proc = _start(tmp_path, "--warm", "0")
    try:
        time.sleep(0.5)
        assert _children(proc.pid) == []
        vm, out = _spawn(path, ["run", "--kernel", "/nonexistent/other"])
        assert vm.wait(10) == 1 and b"does not exist" in _drain(out)
    finally:
        _stop(path, proc)


def _anonymous_mappings(pid: int) -> list[int]:
    sizes = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 5:  # no path: anonymous
                start, end = (int(x, 16) for x in fields[0].split("-"))
                sizes.append(end - start)
    return sizes


@pytest.mark.kvm
def test_after_a_run_the_warm_vmm_loads_its_images_ahead(tmp_path):
    path, proc = _start(tmp_path)
    try:
        first = _warm_child(proc.pid)
        assert 77 << 20 not in _anonymous_mappings(first)
        vm, out = _spawn(path, ["run", "--kernel", "/nonexistent/vmlinux", "--mem", "77"])
        assert vm.pid == first and vm.wait(10) == 1 and b"does not exist" in _drain(out)
        second = _warm_child_other_than(proc.pid, first)
        assert 77 << 20 in _anonymous_mappings(second)  # guest RAM of the next `run`, its images loading into it
        # the same request again takes those images: it fails exactly as before, from the warm VMM
        vm, out = _spawn(path, ["run", "--kernel", "/nonexistent/vmlinux", "--mem", "77"])
        assert vm.pid == second and vm.wait(10) == 1 and b"kernel /nonexistent/vmlinux does not exist" in _drain(out)
        third = _warm_child_other_than(proc.pid, second)
        assert 77 << 20 in _anonymous_mappings(third)
        console = tmp_path / "console.fifo"  # a clone that blocks opening its console until we read it
        os.mkfifo(console)
        vm, out = _spawn(path, ["restore", "--from", str(tmp_path / "nosnap"), "--console", str(console)])
        assert vm.pid == third
        time.sleep(0.5)
        assert 77 << 20 not in _anonymous_mappings(third)  # a request that is not a run frees them at once
        with open(console, "rb"):
            assert vm.wait(20) == 1 and b"is not a snapshot" in _drain(out)
        fourth = _warm_child_other_than(proc.pid, third)
        assert 77 << 20 not in _anonymous_mappings(fourth)  # after another kind of request: nothing loaded ahead
    finally:
        _stop(path, proc)


def _warm_child_other_than(server_pid: int, old: int) -> int:
    deadline = time.monotonic() + 10
    while (child := _warm_child(server_pid)) == old:
        assert time.monotonic() < deadline, "no new warm VMM"
        time.sleep(0.02)
    time.sleep(0.3)  # its images are mapped right after its KVM VM
    return child


def test_a_child_that_cannot_start_exits_1_and_the_server_serves_on(tmp_path):
    path, proc = _start(tmp_path, "--warm", "0")
    try:
        read_end, write_end = os.pipe()
        vm = spawn(path, RunSpec("run", kernel="/nonexistent/vmlinux"), 0, write_end, write_end,
                   cwd=str(tmp_path / "gone"))
        os.close(write_end)
        assert vm.wait(10) == 1 and b"cannot start the VMM" in _drain(read_end)
        time.sleep(0.3)
        assert _children(proc.pid) == []  # the failed child did not carry on as a second server
        vm, out = _spawn(path, ["run", "--kernel", "/nonexistent/vmlinux"])
        assert vm.wait(10) == 1 and b"does not exist" in _drain(out)
    finally:
        _stop(path, proc)
