"""PUT /snapshot's refusals, and the pipelined identity requests a restored clone relies on (real agent, --stdio)."""

from __future__ import annotations

import json
import subprocess

import pytest

from hypervisor import agent_protocol as P
from hypervisor.agent_channel import AgentChannel
from hypervisor.api_server import Request
from hypervisor.control import Controller
from hypervisor.launch import vmm_command
from hypervisor.restore import identity_requests
from hypervisor.snapshot import SnapshotError
from hypervisor.vmm_api import ApiError
from tests.unit.test_vmm_agent_api import PipeAgent


class StoppedMachine:
    stopping = True
    pause_requested = False


def put_snapshot(controller, body: dict):
    return controller(Request("PUT", "/snapshot", {}, json.dumps(body).encode()))


def test_snapshot_route_wants_a_dir_and_a_running_vm():
    controller = Controller(StoppedMachine(), AgentChannel(lambda data: len(data)), lambda n: b"")
    with pytest.raises(ApiError, match="dir must name the directory") as error:
        put_snapshot(controller, {})
    assert error.value.status == 400
    with pytest.raises(ApiError, match="has stopped") as error:
        put_snapshot(controller, {"dir": "/tmp/never-written"})
    assert error.value.status == 409


def test_snapshot_route_refuses_while_a_request_is_in_flight(tmp_path):
    machine = StoppedMachine()
    machine.stopping = False
    agent = AgentChannel(lambda data: len(data))
    agent.adopt("pclite-agent/1 test")
    agent.send_requests([(P.MsgType.PING, b"x")])  # never answered: in flight
    with pytest.raises(ApiError, match="in flight") as error:
        put_snapshot(Controller(machine, agent, lambda n: b""), {"dir": str(tmp_path / "snap")})
    assert error.value.status == 409 and not (tmp_path / "snap").exists()


def test_queued_requests_are_answered_before_later_ones():
    pipe = PipeAgent()
    try:
        assert pipe.channel.ready.wait(10)
        tickets = pipe.channel.send_requests([(P.MsgType.PING, b"first"), (P.MsgType.PING, b"second")])
        assert pipe.channel.exec(["echo", "later"]).stdout == b"later\n"
        assert pipe.channel.await_replies(tickets) == [b"first", b"second"]
        assert not pipe.channel.busy
    finally:
        pipe.close()


def test_identity_requests_are_reseed_clock_hostname():
    requests = identity_requests("clone-7")
    assert [kind for kind, _ in requests] == [P.MsgType.RESEED, P.MsgType.SET_CLOCK, P.MsgType.SET_HOSTNAME]
    assert len(requests[0][1]) == 32 and requests[0][1] != identity_requests("clone-7")[0][1]
    assert requests[2][1] == b"clone-7"
    with pytest.raises(SnapshotError, match="1..64 bytes"):
        identity_requests("x" * 65)


def test_snapshot_cli_without_a_vmm_says_so(tmp_path):
    out = subprocess.run(vmm_command(["snapshot", "--api-sock", str(tmp_path / "none.sock"), "--out",
                                      str(tmp_path / "snap")]), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no VMM at" in out.stderr and not (tmp_path / "snap").exists()
