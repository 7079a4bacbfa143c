"""Write the lean `pclite-runtime` executable: containerd's shim starts the runtime four times per `ctr run --rm`,
and each start pays the interpreter's start-up in full.

  python -m service.runtime.launcher [--python PY] PATH      (`make venv` writes .venv/bin/pclite-runtime)

pip's console script runs the venv's interpreter with site (the venv's site-packages and .pth files): ~60 ms of
each start in the lab, for a runtime that needs nothing but the standard library. The file written here starts
with `#!PY -IS` (isolated: no site, no PYTHON* variables, no cwd on sys.path) and puts this project on sys.path
itself. PY is the quickest to start of this interpreter and the system's python3 (>= 3.11; both tried): a Python
built with a shared libpython spends ~100 ms more per start relocating it in the lab.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """#!{python} -IS
# pclite-runtime, written by `python -m service.runtime.launcher`: an isolated interpreter start (no site), with
# the project on sys.path. Rewrite it after moving the project or the interpreter.
import sys
sys.path.insert(0, {root!r})
from service.runtime.main import main
sys.exit(main())
"""
TRIES = 3


def candidates() -> list[str]:
    found = []
    for python in (sys.executable, shutil.which("python3", path="/usr/bin:/bin"), shutil.which("python3")):
        if python and os.path.realpath(python) not in [os.path.realpath(p) for p in found]:
            found.append(python)
    return found


def start_s(python: str) -> float | None:
    """The quickest of TRIES isolated starts, or None when it is not a Python >= 3.11."""
    best = None
    for _ in range(TRIES):
        started = time.perf_counter()
        try:
            done = subprocess.run([python, "-IS", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                                  capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        took = time.perf_counter() - started
        best = took if best is None else min(best, took)
    return best


def quickest_python() -> str:
    timed = [(took, python) for python in candidates() if (took := start_s(python)) is not None]
    return min(timed)[1] if timed else sys.executable


def write(path: str, python: str | None = None) -> str:
    """Write the launcher at path (atomically, mode 755); returns the interpreter it uses."""
    python = os.path.realpath(python or quickest_python())
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(SCRIPT.format(python=python, root=ROOT))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return python


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    python = None
    if args[:1] == ["--python"] and len(args) >= 2:
        python, args = args[1], args[2:]
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m service.runtime.launcher [--python PY] PATH   (PATH: where to write pclite-runtime)",
              file=sys.stderr)
        return 2
    if python and start_s(python) is None:
        print(f"launcher: {python} is not a Python >= 3.11 that starts: give another --python", file=sys.stderr)
        return 1
    try:
        used = write(args[0], python)
    except OSError as exc:
        print(f"launcher: cannot write {args[0]} ({exc.strerror}): is its directory there and writable?",
              file=sys.stderr)
        return 1
    print(f"wrote {args[0]} (#!{used} -IS, project {ROOT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
