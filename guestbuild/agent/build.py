"""Build the guest agent: a static binary compiled from the .c/.h files here, cached by content.

The key covers every source file, `gcc --version` and the flags, so any change rebuilds; a hit is one `gcc
--version` and a stat().
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from guestbuild.cache import BuildError, build_lock, cache_root, content_key, describe_os_error, publish_dir

SOURCE_DIR = Path(__file__).parent
BINARY_NAME = "pclite-agent"
CC = "gcc"
CFLAGS = ("-std=gnu17", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")
RECIPE_VERSION = "1"
INSTALL_HINT = "install gcc and libc6-dev (`make deps` as root, or `apt-get install gcc libc6-dev`)"


def agent_sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def _compiler_version() -> str:
    if shutil.which(CC) is None:
        raise BuildError(f"building the guest agent needs {CC}, which is not on PATH: {INSTALL_HINT}")
    out = subprocess.run([CC, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BuildError(f"`{CC} --version` failed (exit {out.returncode}): {out.stderr.strip()}; {INSTALL_HINT}")
    return out.stdout


def agent_key(sources: list[Path], compiler_version: str) -> str:
    parts: list[bytes | str] = [b"pclite-agent", RECIPE_VERSION, compiler_version, " ".join(CFLAGS)]
    for source in sources:
        parts += [source.name, source.read_bytes()]
    return content_key(*parts)


def _compile(sources: list[Path], output: Path) -> None:
    cmd = [CC, *CFLAGS, "-o", str(output), *(str(s) for s in sources if s.suffix == ".c")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return
    log = proc.stderr.strip()
    if ("No such file or directory" in log and ".h" in log) or "cannot find -lc" in log:
        raise BuildError(f"compiling the guest agent failed: the C library headers or the static libc.a are "
                         f"missing: {INSTALL_HINT} ({log.splitlines()[0] if log else 'no compiler output'})")
    raise BuildError(f"compiling the guest agent failed (`{' '.join(cmd)}`, exit {proc.returncode}):\n{log}")


def build_agent(force: bool = False) -> Path:
    """Build (or find cached) the static pclite-agent binary; returns its path."""
    sources = agent_sources()
    final = cache_root() / "agent" / agent_key(sources, _compiler_version())
    binary = final / BINARY_NAME
    if binary.exists() and not force:
        return binary
    try:
        with build_lock(final):
            if binary.exists() and not force:
                return binary  # another builder finished it while we waited
            _build(sources, final, force)
    except OSError as exc:
        raise describe_os_error(exc, "building the guest agent") from exc
    return binary


def _build(sources: list[Path], final: Path, force: bool) -> None:
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="pclite-agent-") as tmp:
            # compile outside the cache: a full cache disk then fails as a clear OSError below, not inside gcc
            _compile(sources, Path(tmp) / BINARY_NAME)
            staging.mkdir(parents=True)
            shutil.copy2(Path(tmp) / BINARY_NAME, staging / BINARY_NAME)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if force:
        shutil.rmtree(final, ignore_errors=True)
    publish_dir(staging, final)
