"""deploy/container/Containerfile: a Debian bookworm image that installs pclite, its guest artifacts and runs pclited.

No image can be built here (no registry for base images), so the file is checked against the repository: every
COPY source exists, every Debian package the code needs at build and run time is installed (the Makefile's list
less the test-only ones), every PCLITE_* variable is a pclited setting, and the entrypoint, port and health check
agree with the service.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
# the lab, disk images, the PostgreSQL test server, promtool
TEST_ONLY_PACKAGES = {"qemu-system-x86", "postgresql", "prometheus", "containerd", "runc"}  # pclited itself: no engine


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def of(kind: str) -> list[str]:
    return [args for word, args in instructions() if word == kind]


def env_vars() -> dict[str, str]:
    found = {}
    for args in of("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            found[key] = value
    return found


def installed_packages() -> set[str]:
    packages = set()
    for args in of("RUN"):
        for match in re.finditer(r"apt-get install ([^&]*)", args):
            packages |= {w for w in match.group(1).split() if not w.startswith("-")}
    return packages


def test_debian_bookworm_base():
    (base,) = of("FROM")
    assert base.startswith("debian:bookworm")


def test_copied_sources_exist():
    for args in of("COPY"):
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {s for args in of("COPY") for s in args.split()[:-1]}
    # pclite's packages, the migrations pclited runs at start and the build metadata
    assert {"guestboot", "guestbuild", "hypervisor", "service", "migrations", "alembic.ini", "pyproject.toml"} <= copied


def test_packages_cover_what_the_code_needs():
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"APT_PACKAGES := (.*?)\n(?!\s)", makefile, re.S).group(1)
    needed = set(listed.replace("\\", " ").split()) - TEST_ONLY_PACKAGES
    packages = installed_packages()
    assert needed <= packages, f"Containerfile lacks {needed - packages}"
    from guestbuild.kernel.build import BUILD_TOOLS, SOURCE_PACKAGE

    assert SOURCE_PACKAGE in packages and set(BUILD_TOOLS) <= packages | {"make", "gcc", "flex", "bison", "bc"}
    assert {"python3", "python3-venv", "libc6-dev", "busybox-static", "tini"} <= packages


def test_it_installs_pclite_and_builds_the_guest_artifacts():
    runs = " ".join(of("RUN"))
    assert "pip install" in runs and "-e ." in runs
    assert "python -m guestbuild.kernel build" in runs and "python -m guestbuild.initramfs build" in runs
    assert 'rm -rf "$PCLITE_CACHE/src"' in runs  # the kernel build tree (GBs) stays out of the image


def test_environment_entrypoint_port_and_health_agree_with_the_service():
    from service.core.config import Settings

    env = env_vars()
    known = {f"PCLITE_{name.upper()}" for name in Settings.model_fields} | {"PCLITE_CACHE"}
    pclite_vars = {k for k in env if k.startswith("PCLITE_")}
    assert pclite_vars <= known, pclite_vars - known
    assert of("EXPOSE") == [env["PCLITE_PORT"]]
    assert env["PCLITE_HOST"] == "0.0.0.0"
    (entrypoint,) = of("ENTRYPOINT")
    assert "pclited" in entrypoint and of("CMD") == ['["serve"]']
    (health,) = of("HEALTHCHECK")
    assert f"http://127.0.0.1:{env['PCLITE_PORT']}/healthz" in health
    assert '"/healthz"' in (ROOT / "service" / "api" / "routes" / "health.py").read_text()
    assert of("VOLUME") == [f'["{env["PCLITE_DATA_DIR"]}"]']
