"""The artifact cache under ~/.cache/pclite (or $PCLITE_CACHE): content-keyed directories published atomically."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path


class BuildError(Exception):
    """A build could not be done; the message says what was wrong and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("PCLITE_CACHE") or Path.home() / ".cache" / "pclite")


def content_key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def publish_dir(staging: Path, final: Path) -> Path:
    """Move a fully written staging directory into place; a concurrent builder that won the race is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return final


@contextlib.contextmanager
def build_lock(final: Path):
    """Serialise builders of one artifact (two `make` runs, or a test and a build) on a lock file beside it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(final.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def describe_os_error(exc: OSError, what: str) -> BuildError:
    if exc.errno == errno.ENOSPC:
        return BuildError(f"{what}: no space left on device under {cache_root()}; free some disk or set "
                          f"PCLITE_CACHE to a directory on a larger filesystem")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return BuildError(f"{what}: cannot write {exc.filename or cache_root()} ({exc.strerror}); set PCLITE_CACHE "
                          f"to a writable directory")
    return BuildError(f"{what}: {exc}")


def debian_package_version(package: str) -> str | None:
    """The installed version of a Debian package, or None when it is not installed."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}|${Version}", package],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    status, _, version = out.stdout.partition("|")
    return version if out.returncode == 0 and status.endswith(" installed") else None


def missing_package_error(package: str, what: str) -> BuildError:
    how = "run `make deps`" if os.geteuid() == 0 else "ask an administrator to run `make deps` (needs root)"
    return BuildError(f"{what} needs the Debian package {package}, which is not installed: {how} "
                      f"or `apt-get install {package}`")
