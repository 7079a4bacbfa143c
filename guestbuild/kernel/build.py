"""Build bzImage (LZ4) + vmlinux (ELF with the PVH note) from Debian's linux-source-6.1, keyed by fragment + version.

The key covers the config fragment, the source package version and this recipe's version, so a change of any of
them rebuilds; a hit is a stat() of two files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from guestbuild.cache import (
    BuildError,
    build_lock,
    cache_root,
    content_key,
    debian_package_version,
    describe_os_error,
    missing_package_error,
    publish_dir,
)

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = Path(__file__).with_name("microvm.config")
RECIPE_VERSION = "1"  # bump when the build steps below change what comes out
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc"}


@dataclass(frozen=True)
class KernelArtifacts:
    bzimage: Path
    vmlinux: Path
    key: str


def kernel_cache_key(fragment: bytes, source_version: str) -> str:
    return content_key(b"pclite-kernel", RECIPE_VERSION, fragment, source_version)


def _source_version() -> str:
    version = debian_package_version(SOURCE_PACKAGE)
    if version is None or not SOURCE_TARBALL.exists():
        raise missing_package_error(SOURCE_PACKAGE, "building the guest kernel")
    return version


def _kernel_dir(fragment: bytes, source_version: str) -> Path:
    return cache_root() / "kernels" / kernel_cache_key(fragment, source_version)


def cached_kernel(fragment_path: Path = FRAGMENT) -> KernelArtifacts | None:
    """The cached build for the current fragment and installed source, or None (read-only: safe in the lab)."""
    fragment = fragment_path.read_bytes()
    directory = _kernel_dir(fragment, _source_version())
    artifacts = KernelArtifacts(directory / "bzImage", directory / "vmlinux", directory.name)
    if (directory / "build.json").exists() and artifacts.bzimage.exists() and artifacts.vmlinux.exists():
        return artifacts
    return None


def wanted_options(fragment: bytes) -> dict[str, str]:
    """CONFIG_X=value lines of a fragment; `=n` means 'not set' in the final .config."""
    options = {}
    for line in fragment.decode().splitlines():
        match = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        if match:
            options[match.group(1)] = match.group(2)
    return options


def check_config(final_config: str, wanted: dict[str, str]) -> list[str]:
    """Fragment options that Kconfig dropped (a dependency was missing): returned so the build can fail loudly."""
    actual = {}
    for line in final_config.splitlines():
        if match := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            actual[match.group(1)] = match.group(2)
        elif match := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            actual[match.group(1)] = "n"
    return [f"{name}={value} (got {actual.get(name, 'n')})" for name, value in wanted.items()
            if actual.get(name, "n") != value]


def _check_tools() -> None:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise BuildError(f"building the guest kernel needs {', '.join(missing)}: run `make deps` as root")


def _source_tree(version: str, say) -> Path:
    tree = cache_root() / "src" / f"linux-source-{version}"
    if (tree / ".pclite-extracted").exists():
        return tree
    say(f"extracting {SOURCE_TARBALL} (once per source version)")
    staging = tree.with_name(tree.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(SOURCE_TARBALL) as tar:
        top = tar.next().name.split("/")[0]
        tar.extractall(staging, filter="tar")
    (staging / top / ".pclite-extracted").write_text(version)
    publish_dir(staging / top, tree)
    shutil.rmtree(staging, ignore_errors=True)
    return tree


def _run(cmd: list[str], log, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see {log.name}")


def _make_with_progress(cmd: list[str], log, expected_steps: int, say) -> int:
    """Run make, echoing one progress line (objects built / expected, elapsed) instead of the full output."""
    start = time.monotonic()
    steps = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tty = sys.stderr.isatty()
    last_report = 0.0
    for line in proc.stdout:
        log.write(line)
        if line.startswith("  ") and len(line) > 4 and line[2:4].strip():
            steps += 1
        now = time.monotonic()
        if now - last_report >= (0.5 if tty else 30):
            last_report = now
            pct = min(99, 100 * steps // max(expected_steps, 1))
            message = f"kernel build: {pct:3d}% ({steps} steps, {now - start:.0f}s)"
            if tty:
                sys.stderr.write("\r" + message)
                sys.stderr.flush()
            else:
                say(message)
    if tty:
        sys.stderr.write("\n")
    if proc.wait() != 0:
        raise BuildError(f"kernel build failed (exit {proc.returncode}); see {log.name}")
    return steps


def build_kernel(fragment_path: Path = FRAGMENT, jobs: int | None = None, force: bool = False,
                 say=lambda msg: print(msg, file=sys.stderr)) -> KernelArtifacts:
    fragment = fragment_path.read_bytes()
    version = _source_version()
    if not force and (hit := cached_kernel(fragment_path)):
        return hit
    _check_tools()
    final = _kernel_dir(fragment, version)
    try:
        with build_lock(final):
            if not force and (hit := cached_kernel(fragment_path)):
                return hit  # another builder finished it while we waited
            return _build(fragment, version, final, jobs or os.cpu_count() or 1, say)
    except OSError as exc:
        raise describe_os_error(exc, "building the guest kernel") from exc


def _build(fragment: bytes, version: str, final: Path, jobs: int, say) -> KernelArtifacts:
    tree = _source_tree(version, say)
    staging = final.with_name(final.name + ".partial")  # kept on failure for its build.log
    shutil.rmtree(staging, ignore_errors=True)
    objdir = staging / "obj"
    objdir.mkdir(parents=True)
    (staging / "microvm.config").write_bytes(fragment)
    make = ["make", "-C", str(tree), f"O={objdir}", "ARCH=x86_64", f"-j{jobs}"]
    say(f"building guest kernel {final.name} from {SOURCE_PACKAGE} {version} with {jobs} jobs "
        f"(about 5 min on 2 cores; cached afterwards)")
    started = time.monotonic()
    with open(staging / "build.log", "w") as log:
        _run(make + ["tinyconfig"], log)
        _run([str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(objdir), str(objdir / ".config"),
              str(staging / "microvm.config")], log, cwd=tree)
        _run(make + ["olddefconfig"], log)
        dropped = check_config((objdir / ".config").read_text(), wanted_options(fragment))
        if dropped:
            raise BuildError("the kernel config fragment asks for options Kconfig did not keep (missing "
                             f"dependencies?): {', '.join(dropped)}; fix {FRAGMENT}")
        log.flush()
        steps = _make_with_progress(make + ["bzImage"], log, expected_steps=1550, say=say)
    shutil.copy2(objdir / "arch/x86/boot/bzImage", staging / "bzImage")
    shutil.copy2(objdir / "vmlinux", staging / "vmlinux")
    shutil.copy2(objdir / ".config", staging / "config")
    shutil.rmtree(objdir)
    (staging / "build.json").write_text(json.dumps({
        "source_package": SOURCE_PACKAGE, "source_version": version, "recipe": RECIPE_VERSION,
        "seconds": round(time.monotonic() - started, 1), "steps": steps}, indent=1))
    publish_dir(staging, final)
    say(f"guest kernel ready in {time.monotonic() - started:.0f}s: {final}")
    return KernelArtifacts(final / "bzImage", final / "vmlinux", final.name)
