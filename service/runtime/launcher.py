"""Write the lean `pclite-runtime` executable: containerd's shim starts the runtime four times per `ctr run --rm`,
and each start pays the interpreter's start-up in full.

  python -m service.runtime.launcher [--python PY] PATH      (`make venv` writes .venv/bin/pclite-runtime)

PATH is the quick path (quickpath.c, built with the system's C compiler): `start` and most `delete` calls are
answered there in a few ms, everything else goes to the Python runtime written next to it as PATH-py. Without a C
compiler PATH is the Python runtime itself.

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

from hypervisor import interpreters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """#!{python} -IS
# pclite-runtime, written by `python -m service.runtime.launcher`: an isolated interpreter start (no site), with
# the project on sys.path. Rewrite it after moving the project or the interpreter.
import sys
sys.path.insert(0, {root!r})
from service.runtime.main import main
sys.exit(main())
"""
QUICK_PATH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickpath.c")


def write(path: str, python: str | None = None) -> tuple[str, str | None]:
    """Write the runtime at path (atomically, mode 755): the quick path in front of the Python runtime (PATH-py),
    or the Python runtime alone. Returns (the interpreter used, why there is no quick path or None)."""
    python = os.path.realpath(python or interpreters.quickest_python())
    script, runtime = os.path.abspath(path) + "-py", SCRIPT.format(python=python, root=ROOT).encode()
    _write_atomic(script, runtime)
    why_not = compile_quick_path(path, script)
    if why_not:
        _write_atomic(path, runtime)
    return python, why_not


def compile_quick_path(path: str, python_runtime: str) -> str | None:
    """Build quickpath.c into path, handing over to python_runtime; None when done, else why not."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc)"
    if '"' in python_runtime or "\\" in python_runtime:
        return f"the path {python_runtime} cannot be compiled in"
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        built = subprocess.run([compiler, "-O2", "-Wall", f'-DPYTHON_RUNTIME="{python_runtime}"', "-o", tmp,
                                QUICK_PATH_SOURCE], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{compiler} failed ({exc})"
    if built.returncode != 0:
        return f"{compiler} failed: {built.stderr.strip()[-300:]}"
    os.replace(tmp, path)
    return None


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    python = None
    if args[:1] == ["--python"] and len(args) >= 2:
        python, args = args[1], args[2:]
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m service.runtime.launcher [--python PY] PATH   (PATH: where to write pclite-runtime)",
              file=sys.stderr)
        return 2
    if python and interpreters.start_s(python) is None:
        print(f"launcher: {python} is not a Python >= 3.11 that starts: give another --python", file=sys.stderr)
        return 1
    try:
        used, why_not = write(args[0], python)
    except OSError as exc:
        print(f"launcher: cannot write {args[0]} ({exc.strerror}): is its directory there and writable?",
              file=sys.stderr)
        return 1
    if why_not:
        print(f"wrote {args[0]} (#!{used} -IS, project {ROOT}); no quick path for start/delete: {why_not}")
    else:
        print(f"wrote {args[0]} (quick path for start/delete) and {args[0]}-py (#!{used} -IS, project {ROOT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
