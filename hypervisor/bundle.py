"""The VMM's own modules (hypervisor.*, guestboot.*) compiled into one file, for VMM processes that start with
nothing imported: `run` imports ~45 of them, and each import from a directory costs a stat of its source, an open
and a read of its .pyc (in the lab every one of those is a 9p round trip: ~13 ms a module, ~0.6 s a VMM start).
From the bundle a start reads one file and unmarshals only the modules it imports.

The parent that starts VMMs (hypervisor.launch.vmm_command) calls bundle_path() once: it fingerprints the sources
(path, size, mtime) with the interpreter's bytecode magic, and builds <cache>/vmm-bundle/<fingerprint>.bundle when
that file is missing, so a bundle never serves code other than the sources the parent saw. The child checks the
magic, installs the finder below first on sys.meta_path and imports as usual; anything not bundled (the standard
library, site-packages) is found the ordinary way, and a module's __file__/__path__ still name its source.
"""

from __future__ import annotations

import functools
import hashlib
import marshal
import os
from importlib.util import MAGIC_NUMBER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("hypervisor", "guestboot")
FORMAT = b"pclite-vmm-bundle-1"

# Runs in the child with MODULES = {name: (source path, is package, marshalled code)}: a meta-path finder serving
# those names. Compiled here and shipped inside the bundle, so the child's bootstrap stays one line.
_FINDER_SOURCE = '''
import sys
from _frozen_importlib import ModuleSpec

class BundleFinder:
    """Modules from the pclite VMM bundle (hypervisor/bundle.py)."""
    @staticmethod
    def find_spec(name, path=None, target=None):
        entry = MODULES.get(name)
        if entry is None:
            return None
        spec = ModuleSpec(name, BundleFinder, origin=entry[0], is_package=entry[1])
        if entry[1]:
            spec.submodule_search_locations = [entry[0].rpartition("/")[0]]
        spec.has_location = True
        return spec

    @staticmethod
    def create_module(spec):
        return None

    @staticmethod
    def exec_module(module):
        exec(loads(MODULES[module.__name__][2]), module.__dict__)

sys.meta_path.insert(0, BundleFinder)
'''


def _sources() -> list[tuple[str, str, bool]]:
    """(module name, source path, is package) for every module of PACKAGES, sorted."""
    found = []
    for package in PACKAGES:
        for directory, subdirs, files in os.walk(os.path.join(ROOT, package)):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__" and os.path.exists(
                os.path.join(directory, d, "__init__.py")))
            dotted = os.path.relpath(directory, ROOT).replace(os.sep, ".")
            for name in sorted(files):
                if name.endswith(".py"):
                    is_package = name == "__init__.py"
                    module = dotted if is_package else f"{dotted}.{name[:-3]}"
                    found.append((module, os.path.join(directory, name), is_package))
    return found


def fingerprint(sources: list[tuple[str, str, bool]]) -> str:
    digest = hashlib.sha256(FORMAT + MAGIC_NUMBER)
    for module, path, _ in sources:
        stat = os.stat(path)
        digest.update(f"{module}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def build(path: str, sources: list[tuple[str, str, bool]]) -> None:
    modules = {}
    for module, source_path, is_package in sources:
        with open(source_path, "rb") as source:
            code = compile(source.read(), source_path, "exec", dont_inherit=True)
        modules[module] = (source_path, is_package, marshal.dumps(code))
    finder = compile(_FINDER_SOURCE, __file__ + " (bundle finder)", "exec", dont_inherit=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as out:
        out.write(marshal.dumps((FORMAT, MAGIC_NUMBER, finder, modules)))
    os.replace(tmp, path)


@functools.cache
def bundle_path() -> str | None:
    """The current bundle (built if needed), or None when it cannot be (the VMM then imports from the sources)."""
    from guestbuild.cache import cache_root
    directory = cache_root() / "vmm-bundle"
    try:
        sources = _sources()
        path = directory / f"{fingerprint(sources)}.bundle"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            build(str(path), sources)
            for old in directory.glob("*.bundle"):  # a VMM reads its bundle once, at its start
                if old != path:
                    old.unlink(missing_ok=True)
        return str(path)
    except (OSError, SyntaxError, ValueError):
        return None  # a source that does not compile fails the same way when imported, with its own error


# The child's side, one line in the bootstrap: use the bundle when it is there and made for this interpreter.
CHILD_LOADER = ("try:\n"
                " import marshal, _frozen_importlib_external as _e\n"
                " _f, _m, _c, _b = marshal.loads(open({path!r}, 'rb').read())\n"
                " if _f == {format!r} and _m == _e.MAGIC_NUMBER: exec(_c, {{'MODULES': _b, 'loads': marshal.loads}})\n"
                "except (OSError, ValueError, EOFError, TypeError):\n"
                " pass\n")
