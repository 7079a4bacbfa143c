"""Servers the service tests start for real: a throwaway PostgreSQL cluster, and pclited itself on loopback.

PostgreSQL comes from Debian's `postgresql` package (/usr/lib/postgresql/*/bin): initdb + pg_ctl in a temporary
directory on a free port, run as the `postgres` user (or `nobody`) when the tests run as root, since the server
refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The newest installed server's bin dir, or None when PostgreSQL is not installed."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return candidates[-1] if candidates else None


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="pclite-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self.as_user: list[str] = []
        self._databases = 0
        if os.geteuid() == 0:
            user = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self.as_user = ["runuser", "-u", user, "--"]

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr[-2000:]}\n"
                               f"{log[-2000:]}")

    def start(self) -> PostgresServer:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "pclite", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        for attempt in range(3):  # the free port can be taken between our probe and the server's bind
            self.port = free_port()
            options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                          "-o", options, "-w", "-t", "60", "start")
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://pclite@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh, empty database: each test gets its own."""
        import psycopg

        self._databases += 1
        name = f"pclite_{os.getpid()}_{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=pclite dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://pclite@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def short_tmpdir(prefix: str = "pcl-") -> Path:
    """VMM control sockets live under the data dir: keep it far below the 108-byte sun_path limit."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Pclited:
    """`python -m service.main serve` in a subprocess on 127.0.0.1 (a random port), its log in data_dir."""

    def __init__(self, data_dir: Path, database_url: str | None = None, **settings) -> None:
        self.data_dir = data_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PCLITE_") or k == "PCLITE_CACHE"}
        self.env.update({"PCLITE_DATA_DIR": str(data_dir), "PCLITE_PORT": "0",
                         "PCLITE_CLIENT_CONFIG": str(data_dir / "client-config"), "PYTHONUNBUFFERED": "1"})
        if database_url:
            self.env["PCLITE_DATABASE_URL"] = database_url
        for key, value in settings.items():
            self.env[f"PCLITE_{key.upper()}"] = str(value)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = data_dir / "pclited.log"
        self._log_offset = 0

    def start(self, timeout_s: float = 180.0) -> Pclited:  # a loaded lab takes a while
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.url:  # a restart keeps its port, so clients made before it still work
            self.env["PCLITE_PORT"] = self.url.rsplit(":", 1)[1]
            self.url = ""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "service.main", "serve"], cwd=ROOT, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.url:
            if match := re.search(r"listening on (http://\S+)", self.log()):
                self.url = match.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pclited did not start (exit {self.proc.poll()}):\n{self.log()[-4000:]}")
            time.sleep(0.05)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pclited never became ready:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def token(self) -> str:
        return self.env.get("PCLITE_TOKEN") or (self.data_dir / "token").read_text().strip()

    def client(self, timeout: float = 30.0, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {token or self.token}"})

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pclited ignored {signal.Signals(sig).name} for {timeout_s}s:\n"
                                 f"{self.log()[-3000:]}") from None

    def wait_for(self, what, timeout_s: float, interval_s: float = 0.1, message: str = ""):
        """Poll what() until it returns something truthy; fail with the service log after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = what()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {message or what}\n"
                                     f"pclited log tail:\n{self.log()[-3000:]}\n{self.vm_logs()}")
            time.sleep(interval_s)

    def vm_logs(self, newest: int = 2, chars: int = 1500) -> str:
        """The console and VMM log tails of the newest VMs: why a boot did not become ready."""
        dirs = sorted((self.data_dir / "vms").glob("vm-*"), key=lambda d: d.stat().st_mtime)[-newest:]
        parts = []
        for vm_dir in dirs:
            for name in ("console.log", "vmm.log"):
                with contextlib.suppress(OSError):
                    text = (vm_dir / name).read_bytes()[-chars:].decode(errors="replace")
                    parts.append(f"--- {vm_dir.name}/{name} (tail)\n{text}")
        return "\n".join(parts)


def vmm_processes(run_dir: Path) -> dict[str, int]:
    """{socket: pid} of VMM processes (fresh or forked) whose socket is under run_dir, as pclited finds them."""
    from service.services.procfs import scan_vmms
    return scan_vmms(run_dir)


_shared: PostgresServer | None = None


def shared_postgres() -> PostgresServer:
    """One cluster for the whole test session (each test takes a new database in it); stopped at exit."""
    global _shared
    if _shared is None:
        bindir = postgres_bindir()
        if bindir is None:
            import pytest
            pytest.skip("PostgreSQL server binaries are absent (/usr/lib/postgresql/*/bin/initdb): "
                        "install Debian's `postgresql` package (make deps)")
        import atexit
        _shared = PostgresServer(bindir).start()
        atexit.register(_shared.stop)
    return _shared


def database_url(backend: str, tmp_dir: Path) -> str:
    """A fresh empty database of that backend: a SQLite file in tmp_dir, or a new PostgreSQL database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_dir / 'pclite.db'}"
    return shared_postgres().new_database()


@contextlib.contextmanager
def running_pclited(start_timeout_s: float = 180.0, **settings):
    """A started Pclited in a fresh data dir; afterwards its flavors and VMs are deleted, it is stopped, and any VMM
    still running (pool VMs, or template VMs under run/tpl) is killed and fails the test."""
    workdir = short_tmpdir()
    svc = Pclited(workdir / "data", **settings)
    svc.start(start_timeout_s)
    yield svc
    with contextlib.suppress(Exception), svc.client() as api:
        for flavor in api.get("/v1/flavors").json():
            api.delete(f"/v1/flavors/{flavor['name']}")
        for vm in api.get("/v1/vms").json():
            if vm["state"] not in ("stopped", "failed"):
                api.delete(f"/v1/vms/{vm['id']}", params={"wait": "true"})
    svc.stop()
    leftovers = vmm_processes(workdir / "data" / "run") | vmm_processes(workdir / "data" / "run" / "tpl")
    for pid in leftovers.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(workdir, ignore_errors=True)
    assert not leftovers, f"VMMs left running after the test: {leftovers}"
