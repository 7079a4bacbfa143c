"""Which Python starts fastest: the one running, or the system's python3. A Python built with a shared libpython
(pyenv's, some venvs') spends ~0.15 s more per start relocating it in the lab (measured: 0.27-0.35 s vs 0.13 s for
Debian's /usr/bin/python3 with `-S`). VMM processes and pclite-runtime start often, so they use the quickest.

  vmm_python()        for VMM processes: same major.minor as this one (they load its site-packages' C extensions,
                      lz4/zstandard); the choice is cached in <cache>/vmm-python.json, keyed by the kernel
                      (uname) and the interpreters' size and mtime. PCLITE_VMM_PYTHON=PATH picks one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

TRIES = 3


def candidates() -> list[str]:
    found: list[str] = []
    for python in (sys.executable, shutil.which("python3", path="/usr/bin:/bin"), shutil.which("python3")):
        if python and os.path.realpath(python) not in [os.path.realpath(p) for p in found]:
            found.append(python)
    return found


def start_s(python: str, version_check: str = "sys.version_info < (3, 11)") -> float | None:
    """The quickest of TRIES isolated starts, or None when it does not start or version_check is true there."""
    best = None
    for _ in range(TRIES):
        started = time.perf_counter()
        try:
            done = subprocess.run([python, "-IS", "-c", f"import sys; sys.exit({version_check})"],
                                  capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        took = time.perf_counter() - started
        best = took if best is None else min(best, took)
    return best


def quickest_python(version_check: str = "sys.version_info < (3, 11)") -> str:
    timed = [(took, python) for python in candidates() if (took := start_s(python, version_check)) is not None]
    return min(timed)[1] if timed else sys.executable


def _identity(python: str) -> list:
    stat = os.stat(python)
    return [os.path.realpath(python), stat.st_size, stat.st_mtime_ns]


def vmm_python() -> str:
    if os.environ.get("PCLITE_VMM_PYTHON"):
        return os.environ["PCLITE_VMM_PYTHON"]
    if _chosen:
        return _chosen[0]
    from guestbuild.cache import cache_root
    record = cache_root() / "vmm-python.json"
    try:  # the same files start at different speeds on another kernel (the lab shares this cache with its host)
        key = [list(os.uname()), *(_identity(python) for python in candidates())]
    except OSError:
        return sys.executable
    try:
        cached = json.loads(record.read_text())
        if cached["key"] == key and os.path.exists(cached["python"]):
            _chosen.append(cached["python"])
            return cached["python"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    python = quickest_python(f"sys.version_info[:2] != {tuple(sys.version_info[:2])}")
    _chosen.append(python)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "python": python}))
        os.replace(tmp, record)
    except OSError:
        pass  # measured again next time
    return python


_chosen: list[str] = []  # per process: measured or read once
