"""The command line that starts a VMM process fastest: `vmm_command(["run", "--kernel", ...])`.

Every VMM is started by our own code (tests, bench, pclited), so the child skips what a general-purpose
interpreter start does: `-S` (no site: no venv/.pth/site-packages scan, about half of a bare start in the lab)
and `-P` (no cwd on sys.path: one stat less per import). The one-line bootstrap appends the two paths site would
have added: this project and the caller's site-packages (lz4/zstandard for --boot unpack).
It also turns bytecode caching back on under PYTHONDONTWRITEBYTECODE=1: compiling the VMM's ~40 modules from
source on every start costs more than all of their imports from .pyc files.

The command reads `python -S -P -c <bootstrap> hypervisor run ...`: "hypervisor" stays an argv element, as with
`python -m hypervisor`, for whoever looks for VMMs in /proc/*/cmdline.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BOOTSTRAP = ("import sys; sys.path += {paths!r}; sys.dont_write_bytecode = False; "
              "from hypervisor.__main__ import main; sys.exit(main(sys.argv[2:]))")


def vmm_command(args: list[str], python: str | None = None) -> list[str]:
    """argv for `python -m hypervisor *args`, started lean. `python` defaults to this interpreter."""
    paths = [ROOT]
    for path in sys.path:
        if path.endswith(("site-packages", "dist-packages")) and path not in paths:
            paths.append(path)
    return [python or sys.executable, "-S", "-P", "-c", _BOOTSTRAP.format(paths=paths), "hypervisor", *args]
