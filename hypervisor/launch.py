"""The command line that starts a VMM process fastest: `vmm_command(["run", "--kernel", ...])`.

Every VMM is started by our own code (tests, bench, pclited), so the child skips what a general-purpose
interpreter start does: `-S` (no site: no venv/.pth/site-packages scan, about half of a bare start in the lab)
and `-P` (no cwd on sys.path: one stat less per import). The one-line bootstrap appends the two paths site would
have added: this project and the caller's site-packages (lz4/zstandard for --boot unpack).
It also turns bytecode caching back on under PYTHONDONTWRITEBYTECODE=1: compiling the VMM's ~40 modules from
source on every start costs more than all of their imports from .pyc files.

The VMM's own modules come from one precompiled file (hypervisor/bundle.py) instead of ~45 .pyc files, and the
interpreter is the quickest to start of this one and the system's python3 (hypervisor/interpreters.py).

The command reads `python -S -P -c <bootstrap> hypervisor run ...`: "hypervisor" stays an argv element, as with
`python -m hypervisor`, for whoever looks for VMMs in /proc/*/cmdline.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BOOTSTRAP = ("import sys; sys.path += {paths!r}; sys.dont_write_bytecode = False\n{bundle}"
              "from hypervisor.__main__ import main; sys.exit(main(sys.argv[2:]))")


def vmm_command(args: list[str], python: str | None = None) -> list[str]:
    """argv for `python -m hypervisor *args`, started lean. `python` defaults to the quickest-starting interpreter of
    this Python version (hypervisor/interpreters.py)."""
    paths = [ROOT]
    for path in sys.path:
        if path.endswith(("site-packages", "dist-packages")) and path not in paths:
            paths.append(path)
    bundle = ""
    if os.environ.get("PCLITE_VMM_BUNDLE", "1") != "0":  # 0: import the VMM from its sources (debugging)
        from hypervisor.bundle import CHILD_LOADER, FORMAT, bundle_path
        path = bundle_path()
        bundle = CHILD_LOADER.format(path=path, format=FORMAT) if path else ""
    if python is None:
        from hypervisor.interpreters import vmm_python
        python = vmm_python()
    return [python, "-S", "-P", "-c", _BOOTSTRAP.format(paths=paths, bundle=bundle),
            "hypervisor", *args]
