"""CPU priority of VMM processes: refills boot niced, a claimed VM gets pclited's own priority back."""

from __future__ import annotations

import contextlib
import os


def can_raise_priority(to_nice: int = 0) -> bool:
    """Whether this process may lower a nice value back to to_nice (root, CAP_SYS_NICE, or RLIMIT_NICE)."""
    if os.geteuid() == 0:
        return True
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            caps = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
        if caps >> 23 & 1:  # CAP_SYS_NICE
            return True
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return soft == resource.RLIM_INFINITY or 20 - soft <= to_nice  # the lowest nice allowed is 20 - soft


def set_nice(pid: int, nice: int) -> bool:
    """Renice every thread of a process: nice is per thread on Linux (new threads inherit their creator's)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone: nothing left to renice
    done = True
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:  # that thread ended meanwhile
            pass
        except OSError:  # EPERM/EACCES: we may not
            done = False
    return done
