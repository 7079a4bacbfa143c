"""`start` and `delete`: after create, the two commands every container's life waits on, with no more imported
than they need (the state files; for delete, the HTTP client). Each module is ~10 ms of a runtime start in the lab.
"""

import os
import time

from service.runtime.main import START_TIMEOUT_S, container_of
from service.runtime.state import Log, RuntimeFailure, alive, remove_tree


def cmd_start(root: str, opts: dict, positional: list[str], log: Log) -> int:
    c = container_of(root, positional)
    state = c.load_lean()
    status = c.status(state)
    if status != "created":
        raise RuntimeFailure(f"cannot start container {c.id}: it is {status}, not created")
    try:
        fd = os.open(c.path("exec.fifo"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeFailure(f"cannot start container {c.id}: its stand-in process is not waiting "
                             f"({exc.strerror}): delete it and create it again") from None
    os.write(fd, b"0")
    os.close(fd)
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    while not os.path.exists(c.path("init.json")):
        gone = not alive(state["pid"], state["start_time"])  # before init.error: it writes that, then exits
        if os.path.exists(c.path("init.error")):
            with open(c.path("init.error")) as f:
                raise RuntimeFailure(f"start {c.id}: {f.read().strip()}")
        if gone or time.monotonic() > deadline:
            raise RuntimeFailure(f"start {c.id}: the stand-in process ended before the guest process started "
                                 f"(see the log{': ' + state['log'] if state.get('log') else ''})")
        time.sleep(0.003)
    log.info(f"start {c.id}: the guest process runs after {(time.monotonic() - started) * 1000:.0f} ms")
    return 0


def cmd_delete(root: str, opts: dict, positional: list[str], log: Log) -> int:
    c = container_of(root, positional)
    force = bool(opts.get("force") or opts.get("f"))
    if not c.exists():
        if force:
            remove_tree(c.dir)
            return 0
        raise RuntimeFailure(f"container {c.id} does not exist")
    state = c.load_lean()
    status = c.status(state)
    if status != "stopped" and not force:
        raise RuntimeFailure(f"cannot delete container {c.id} that is not stopped: {status}")
    if force:
        for pid, started in [(state.get("pid"), state.get("start_time"))] + \
                [(pid, record.get("start_time")) for pid, record in c.execs().items()]:
            if alive(pid, started):
                try:  # noqa: SIM105 - contextlib costs start-up time
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
    if os.path.exists(c.path("released")):  # by the init stand-in when the process ended
        remove_tree(c.dir)
        log.info(f"delete {c.id}: VM {state['vm_id']} was released when its process ended")
        return 0
    from service.runtime.transport import Pclited, Unreachable, WireError
    started = time.monotonic()
    try:
        Pclited(state.get("server")).release(state["vm_id"])
    except Unreachable as exc:
        if not force:
            raise RuntimeFailure(f"delete {c.id}: could not release VM {state['vm_id']}: {exc}") from None
        log.warning(f"delete {c.id}: VM {state['vm_id']} is left to pclited: {exc}")
    except WireError as exc:
        if exc.status != 404:  # 404: pclited no longer knows it
            raise RuntimeFailure(f"delete {c.id}: could not release VM {state['vm_id']}: {exc}") from None
    remove_tree(c.dir)
    log.info(f"delete {c.id}: VM {state['vm_id']} released in {(time.monotonic() - started) * 1000:.0f} ms")
    return 0
