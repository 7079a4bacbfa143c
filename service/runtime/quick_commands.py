"""`start` and `delete`: after create, the two commands every container's life waits on, with no more imported
than they need (the state files; for a delete that releases a VM, the HTTP client). Each module is ~10 ms of a
runtime start in the lab.

What each may do is decided from the state directory's files alone, in start_rule and delete_rule. quickpath.c
answers the same calls without starting Python and mirrors these two functions case by case (or hands the call
over): tests/unit/test_runtime_rules.py runs both over the same state directories. Change them together.
"""

import os
import time

from service.runtime.arguments import container_of, switch
from service.runtime.state import Container, Log, RuntimeFailure, alive, remove_tree

START_TIMEOUT_S = 60.0  # quickpath.c's START_TIMEOUT_S

# delete_rule's answers
NOTHING = "nothing"  # --force, and no directory: containerd's cleanup after every task delete
CLEAR = "clear"  # --force, and a directory without state.json: a create that stopped half-way
FILES = "files"  # stopped, its VM released by the stand-in (`released`), no stand-in alive: remove the files
RELEASE = "release"  # the VM may still be claimed, or stand-ins run: (--force kills them) release through pclited


def start_rule(container: Container) -> dict:
    """`start` goes on only for a created container (its stand-in alive, not paused, no guest process yet):
    returns its lean state, else raises the reason."""
    state = container.load_lean()
    status = container.status(state)
    if status != "created":
        raise RuntimeFailure(f"cannot start container {container.id}: it is {status}, not created")
    return state


def delete_rule(container: Container, force: bool) -> tuple[str, dict | None]:
    """(one of NOTHING, CLEAR, FILES, RELEASE; the lean state or None), or raises why `delete` refuses."""
    if not container.exists():
        if not force:
            raise RuntimeFailure(f"container {container.id} does not exist")
        return (CLEAR if os.path.lexists(container.dir) else NOTHING), None
    state = container.load_lean()
    status = container.status(state)
    if status != "stopped" and not force:
        raise RuntimeFailure(f"cannot delete container {container.id} that is not stopped: {status}")
    if status == "stopped" and os.path.exists(container.path("released")) and not container.execs():
        return FILES, state
    return RELEASE, state


def cmd_start(root: str, opts: dict, positional: list[str], log: Log) -> int:
    container = container_of(root, positional)
    state = start_rule(container)
    try:
        fd = os.open(container.path("exec.fifo"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeFailure(f"cannot start container {container.id}: its stand-in process is not waiting "
                             f"({exc.strerror}): delete it and create it again") from None
    os.write(fd, b"0")
    os.close(fd)
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    while not os.path.exists(container.path("init.json")):
        gone = not alive(state["pid"], state["start_time"])  # before init.error: it writes that, then exits
        if os.path.exists(container.path("init.error")):
            with open(container.path("init.error")) as f:
                raise RuntimeFailure(f"start {container.id}: {f.read().strip()}")
        if gone or time.monotonic() > deadline:
            raise RuntimeFailure(f"start {container.id}: the stand-in process ended before the guest process started "
                                 f"(see the log{': ' + state['log'] if state.get('log') else ''})")
        time.sleep(0.003)
    log.info(f"start {container.id}: the guest process runs after {(time.monotonic() - started) * 1000:.0f} ms")
    return 0


def cmd_delete(root: str, opts: dict, positional: list[str], log: Log) -> int:
    container = container_of(root, positional)
    force = switch(opts, "force", "f")
    action, state = delete_rule(container, force)
    if action in (NOTHING, CLEAR):
        remove_tree(container.dir)
        return 0
    if action == RELEASE and force:
        _kill_stand_ins(container, state)
    if os.path.exists(container.path("released")):  # FILES, or RELEASE of one whose stand-ins --force just killed
        remove_tree(container.dir)
        log.info(f"delete {container.id}: VM {state['vm_id']} was released when its process ended")
        return 0
    _release(container, state, force, log)
    remove_tree(container.dir)
    return 0


def _kill_stand_ins(container: Container, state: dict) -> None:
    for pid, started in [(state.get("pid"), state.get("start_time"))] + \
            [(pid, record.get("start_time")) for pid, record in container.execs().items()]:
        if alive(pid, started):
            try:  # noqa: SIM105 - contextlib costs start-up time
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _release(container: Container, state: dict, force: bool, log: Log) -> None:
    from service.runtime.peers import pclited
    from service.runtime.transport import Unreachable, WireError
    started = time.monotonic()
    try:
        pclited(state.get("server")).release(state["vm_id"])
    except Unreachable as exc:
        if not force:
            raise RuntimeFailure(f"delete {container.id}: could not release VM {state['vm_id']}: {exc}") from None
        log.warning(f"delete {container.id}: VM {state['vm_id']} is left to pclited: {exc}")
        return
    except WireError as exc:
        if exc.status != 404:  # 404: pclited no longer knows it
            raise RuntimeFailure(f"delete {container.id}: could not release VM {state['vm_id']}: {exc}") from None
    log.info(f"delete {container.id}: VM {state['vm_id']} released in {(time.monotonic() - started) * 1000:.0f} ms")
