"""CONTRACT STUB of pclited's REST API, and the harness the CLI tests share.

pclitectl is tested as a user runs it: the real `pclitectl` console script in a subprocess, talking HTTP to a real
server on 127.0.0.1. VMs cannot boot on this host (its /dev/kvm cannot boot Linux), so the routes that need VMs
(run, exec, logs, describe vm, delete vm, top's boot percentiles) are served here by `ContractStub`: a tiny uvicorn
app that implements the REST contract pclited publishes (issue 6's brief: problem+json errors, bearer auth, the
Flavor/Pool/VM/exec shapes, /metrics from a real prometheus_client registry). It is a stand-in for pclited, never
shipped. Flavors, pools, apply and errors are also tested against the real pclited when it can start here
(test_cli_real_server.py). The tests at the bottom pin the stub to the contract, so a drift shows here first.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

TOKEN = "stub-token-0123456789"
PHASES = ("vmm_setup", "kernel", "init_to_agent", "total")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def problem(status: int, title: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail},
                        status_code=status, media_type="application/problem+json", headers=headers)


class ContractStub:
    """In-memory flavors, VMs and events behind the contract's routes. Tests seed and inspect it directly."""

    FLAVOR_DEFAULTS = {"kernel": None, "initrd": None, "cmdline_extra": "", "vcpus": 1, "mem_mib": 256,
                       "pool_min": 0, "pool_target": 1, "max_age_s": 3600, "clone": True}
    FLAVOR_FIELDS = set(FLAVOR_DEFAULTS)

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.flavors: dict[str, dict] = {}
        self.vms: dict[str, dict] = {}
        self.events: list[dict] = []
        self.consoles: dict[str, str] = {}
        self.exec_requests: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self._next = 0
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.boot_phase = Histogram("pclite_boot_phase_seconds", "boot phases", ["phase", "flavor"],
                                    buckets=BUCKETS, registry=self.registry)
        self.claim_seconds = Histogram("pclite_claim_seconds", "claim latency", ["flavor", "result"],
                                       buckets=BUCKETS, registry=self.registry)
        self.claims = Counter("pclite_claims", "claims", ["flavor", "result"], registry=self.registry)
        self.vm_gauge = Gauge("pclite_vms", "VMs by state", ["state"], registry=self.registry)
        self.crashes = Counter("pclite_vmm_crashes", "VMM crashes", registry=self.registry)
        self.app = self._build()

    # -- seeding -----------------------------------------------------------------------------------------------

    def add_flavor(self, name: str, **fields) -> dict:
        flavor = {"name": name, **self.FLAVOR_DEFAULTS, **fields, "created_at": _now(), "updated_at": _now(),
                  "template": {"state": "pending", "failures": 0}}
        self.flavors[name] = flavor
        return flavor

    def add_vm(self, flavor: str, state: str = "ready", *, boot_ms: dict | None = None, console: str = "") -> dict:
        self._next += 1
        vm_id = f"vm{self._next:04d}abcd"
        boot = boot_ms if boot_ms is not None else {"vmm_setup": 12.0, "kernel": 95.0, "init_to_agent": 30.0,
                                                    "total": 137.0}
        vm = {"id": vm_id, "flavor": flavor, "state": state, "pid": 4000 + self._next,
              "api_socket": f"/run/pclite/{vm_id}.sock", "created_at": _now(),
              "ready_at": _now() if state in ("ready", "claimed") else None,
              "claimed_at": _now() if state == "claimed" else None, "stopped_at": None,
              "boot_ms": boot if state != "booting" else None, "failure_reason": None, "source": "cold",
              "template": None}
        self.vms[vm_id] = vm
        self.consoles[vm_id] = console or f"[    0.000000] Linux version 6.1.0-pclite\npclite-init: agent up {vm_id}\n"
        self.event(vm_id, flavor, "created", "VMM started")
        if state in ("ready", "claimed"):
            self.event(vm_id, flavor, "ready", f"agent answered after {boot.get('total')} ms")
            for phase in PHASES:
                if boot.get(phase) is not None:
                    self.boot_phase.labels(phase, flavor).observe(boot[phase] / 1000)
        return vm

    def event(self, vm_id: str, flavor: str, kind: str, message: str) -> None:
        self.events.append({"id": len(self.events) + 1, "vm_id": vm_id, "flavor": flavor, "kind": kind,
                            "message": message, "at": _now()})

    def pool(self, name: str) -> dict:
        flavor = self.flavors[name]
        count = lambda s: sum(1 for v in self.vms.values() if v["flavor"] == name and v["state"] == s)  # noqa: E731
        return {"flavor": name, "target": flavor["pool_target"], "min": flavor["pool_min"], "ready": count("ready"),
                "booting": count("booting"), "claimed": count("claimed"), "state": "ok", "reason": None}

    # -- the app ---------------------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI()
        stub = self

        @app.middleware("http")
        async def auth(request: Request, call_next):
            stub.requests.append((request.method, request.url.path))
            if request.url.path not in ("/healthz", "/readyz", "/metrics"):
                header = request.headers.get("authorization", "")
                if header != f"Bearer {stub.token}":
                    detail = "missing Authorization header" if not header else "invalid token"
                    return problem(401, "Unauthorized", f"{detail} (the token is in the pclited data dir)")
            return await call_next(request)

        @app.get("/healthz")
        def healthz():
            return {"status": "ok"}

        @app.get("/v1/version")
        def version():
            return {"version": "0.1.0-stub"}

        @app.get("/metrics")
        def metrics():
            from prometheus_client import generate_latest

            for state in ("booting", "ready", "claimed", "stopping", "stopped", "failed"):
                stub.vm_gauge.labels(state).set(sum(1 for v in stub.vms.values() if v["state"] == state))
            return Response(generate_latest(stub.registry), media_type="text/plain; version=0.0.4")

        def check_flavor(body: dict, *, partial: bool) -> JSONResponse | None:
            unknown = set(body) - stub.FLAVOR_FIELDS - ({"name"} if not partial else set())
            if unknown:
                return problem(422, "Unprocessable Entity", f"{sorted(unknown)[0]}: Extra inputs are not permitted")
            if body.get("mem_mib") is not None and not 64 <= body["mem_mib"] <= 262144:
                bound = "greater than or equal to 64" if body["mem_mib"] < 64 else "less than or equal to 262144"
                return problem(422, "Unprocessable Entity", f"mem_mib: Input should be {bound}")
            return None

        @app.get("/v1/flavors")
        def list_flavors():
            return list(stub.flavors.values())

        @app.post("/v1/flavors", status_code=201)
        async def create_flavor(request: Request):
            body = await request.json()
            if (bad := check_flavor(body, partial=False)) is not None:
                return bad
            if body["name"] in stub.flavors:
                return problem(409, "Conflict", f"flavor {body['name']!r} already exists")
            return stub.add_flavor(body.pop("name"), **body)

        @app.get("/v1/flavors/{name}")
        def get_flavor(name: str):
            if name not in stub.flavors:
                return problem(404, "Not Found", f"no flavor {name!r}")
            return stub.flavors[name]

        @app.patch("/v1/flavors/{name}")
        async def patch_flavor(name: str, request: Request):
            if name not in stub.flavors:
                return problem(404, "Not Found", f"no flavor {name!r}")
            body = await request.json()
            if (bad := check_flavor(body, partial=True)) is not None:
                return bad
            stub.flavors[name].update(body, updated_at=_now())
            return stub.flavors[name]

        @app.delete("/v1/flavors/{name}", status_code=204)
        def delete_flavor(name: str):
            if stub.flavors.pop(name, None) is None:
                return problem(404, "Not Found", f"no flavor {name!r}")
            return Response(status_code=204)

        @app.get("/v1/pools")
        def list_pools():
            return [stub.pool(name) for name in stub.flavors]

        @app.get("/v1/pools/{name}")
        def get_pool(name: str):
            if name not in stub.flavors:
                return problem(404, "Not Found", f"no pool for flavor {name!r}")
            return stub.pool(name)

        @app.patch("/v1/pools/{name}")
        async def patch_pool(name: str, request: Request):
            if name not in stub.flavors:
                return problem(404, "Not Found", f"no pool for flavor {name!r}")
            stub.flavors[name]["pool_target"] = (await request.json())["target"]
            return stub.pool(name)

        @app.post("/v1/vms", status_code=201)
        async def claim(request: Request):
            body = await request.json()
            flavor = body["flavor"]
            if flavor not in stub.flavors:
                return problem(404, "Not Found", f"no flavor {flavor!r}")
            ready = [v for v in stub.vms.values() if v["flavor"] == flavor and v["state"] == "ready"]
            if not ready and not body.get("wait", True):
                return problem(503, "Service Unavailable", f"pool {flavor!r} has no ready VM",
                               headers={"Retry-After": "2"})
            result = "hit" if ready else "miss"
            vm = ready[0] if ready else stub.add_vm(flavor, "ready")
            vm.update(state="claimed", claimed_at=_now())
            stub.claims.labels(flavor, result).inc()
            stub.claim_seconds.labels(flavor, result).observe(0.004 if result == "hit" else 0.9)
            stub.event(vm["id"], flavor, "claimed", f"claimed ({result})")
            return {**vm, "claim": result}

        @app.get("/v1/vms")
        def list_vms(flavor: str | None = None, state: str | None = None, watch: bool = False):
            def listed() -> dict[str, dict]:
                return {k: dict(v) for k, v in stub.vms.items()
                        if (flavor is None or v["flavor"] == flavor) and (state is None or v["state"] == state)}

            if not watch:
                return list(listed().values())

            def events():  # pclited's watch shape: ADDED for what is there, then each change
                seen: dict[str, dict] = {}
                rv = 0
                while True:
                    now = listed()
                    for vm_id, vm in now.items():
                        if seen.get(vm_id) != vm:
                            rv += 1
                            kind = "MODIFIED" if vm_id in seen else "ADDED"
                            yield json.dumps({"type": kind, "object": vm, "resourceVersion": rv}) + "\n"
                    for vm_id in set(seen) - set(now):
                        rv += 1
                        yield json.dumps({"type": "DELETED", "object": seen[vm_id], "resourceVersion": rv}) + "\n"
                    seen = now
                    time.sleep(0.05)

            return StreamingResponse(events(), media_type="application/x-ndjson")

        @app.get("/v1/vms/{vm_id}")
        def get_vm(vm_id: str):
            if vm_id not in stub.vms:
                return problem(404, "Not Found", f"no VM {vm_id!r}")
            return stub.vms[vm_id]

        @app.delete("/v1/vms/{vm_id}", status_code=204)
        def delete_vm(vm_id: str):
            if stub.vms.pop(vm_id, None) is None:
                return problem(404, "Not Found", f"no VM {vm_id!r}")
            return Response(status_code=204)

        @app.get("/v1/vms/{vm_id}/console")
        def console(vm_id: str, tail: int | None = None):
            if vm_id not in stub.vms:
                return problem(404, "Not Found", f"no VM {vm_id!r}")
            text = stub.consoles.get(vm_id, "")
            if tail is not None:
                text = "".join(text.splitlines(keepends=True)[-tail:]) if tail else ""
            return PlainTextResponse(text)

        @app.get("/v1/vms/{vm_id}/events")
        def events(vm_id: str):
            if vm_id not in stub.vms:
                return problem(404, "Not Found", f"no VM {vm_id!r}")
            return [e for e in stub.events if e["vm_id"] == vm_id]

        @app.post("/v1/vms/{vm_id}/exec")
        async def exec_(vm_id: str, request: Request):
            if vm_id not in stub.vms:
                return problem(404, "Not Found", f"no VM {vm_id!r}")
            if stub.vms[vm_id]["state"] != "claimed":
                return problem(409, "Conflict", f"VM {vm_id!r} is {stub.vms[vm_id]['state']}: claim it first")
            body = await request.json()
            stub.exec_requests.append(body)
            return fake_exec(body)

        return app


def fake_exec(body: dict) -> dict:
    """A few programs with known behaviour, standing in for the guest agent."""
    argv = body["argv"]
    stdin = base64.b64decode(body.get("stdin_b64") or "")
    out, err, code, sig, timed_out = b"", b"", 0, None, False
    program, args = argv[0], argv[1:]
    if program == "echo":
        out = (" ".join(args) + "\n").encode()
    elif program == "cat":
        out = stdin
    elif program == "binary":
        out, err = bytes(range(256)), b"\xff\xfe err\n"
    elif program == "fail":
        err, code = b"it failed\n", int(args[0]) if args else 1
    elif program == "kill":
        code, sig = None, int(args[0])
    elif program == "sleep":
        timed_out = body.get("timeout_s") is not None and float(args[0]) > body["timeout_s"]
        code = None if timed_out else 0
    elif program == "env":
        out = "".join(f"{k}={v}\n" for k, v in (body.get("env") or {}).items()).encode()
        out += f"cwd={body.get('cwd', '/')}\n".encode()
    else:
        err, code = f"{program}: not found\n".encode(), 127
    return {"exit_code": code, "signal": sig, "timed_out": timed_out, "stdout_b64": base64.b64encode(out).decode(),
            "stderr_b64": base64.b64encode(err).decode(), "stdout_truncated": False, "stderr_truncated": False,
            "duration_ms": 1.5}


# -- harness ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(app) -> str:
    """A real uvicorn server for `app` on 127.0.0.1, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the contract stub did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def pclitectl_argv() -> list[str]:
    script = Path(sys.executable).with_name("pclitectl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without PCLITE_*/XDG_CONFIG_HOME, with HOME in a tmp dir (no real config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCLITE_") and k != "XDG_CONFIG_HOME"}
    env.update(HOME=str(home), NO_COLOR="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_cli(*args: str, env: dict[str, str], stdin: bytes | str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real pclitectl; stdout and stderr come back as bytes."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run(pclitectl_argv() + list(args), env=env, input=data,
                          stdin=None if data is not None else subprocess.DEVNULL, capture_output=True,
                          timeout=timeout)


class Cli:
    """`cli("get", "pools")` runs pclitectl against one server with its token; `.env` can be changed."""

    def __init__(self, url: str, token: str, home: Path):
        self.url, self.token, self.home = url, token, home
        self.env = clean_env(home, PCLITE_SERVER=url, PCLITE_TOKEN=token)

    def __call__(self, *args: str, stdin: bytes | str | None = None, ok: bool = True,
                 timeout: float = 60) -> subprocess.CompletedProcess:
        result = run_cli(*args, env=self.env, stdin=stdin, timeout=timeout)
        if ok:
            assert result.returncode == 0, (f"pclitectl {' '.join(args)} exited {result.returncode}\n"
                                            f"stdout: {result.stdout.decode(errors='replace')}\n"
                                            f"stderr: {result.stderr.decode(errors='replace')}")
        return result


def start_pclited(home: Path, *, cache: Path, **env: str) -> tuple[subprocess.Popen, dict]:
    """The real `pclited serve` on a free port, its data and config under `home` as on a user's first start.

    Returns the process and the client config pclited wrote (server URL and token). `cache` is the artifact cache:
    the real one boots real VMs; an empty one makes each boot fail at once ("kernel not built") without a VMM.
    """
    environment = clean_env(home, PCLITE_DATA_DIR=str(home / "data"), PCLITE_RUN_DIR=str(home / "run"),
                            PCLITE_CACHE=str(cache), PCLITE_PORT="0", PCLITE_VMM_DETACH="false", **env)
    log_path = home / "pclited.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("pclited")), "serve"], env=environment,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    config_file = home / ".config" / "pclite" / "config"
    deadline = time.monotonic() + 180  # the emulated lab imports pclited over 9p: tens of seconds there
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pclited exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if config_file.exists() and config_file.stat().st_size:
            import yaml

            config = yaml.safe_load(config_file.read_text())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{config['server']}/readyz", timeout=2).status_code == 200:
                    return proc, config
        if time.monotonic() > deadline:
            stop_pclited(proc)
            raise RuntimeError(f"pclited did not get ready in 180s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_pclited(proc: subprocess.Popen) -> None:
    """SIGTERM to pclited's process group (it and any VMM it started), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still there (a VMM it left)


@pytest.fixture
def stub() -> ContractStub:
    return ContractStub()


@pytest.fixture
def stub_cli(stub, tmp_path):
    with serve(stub.app) as url:
        yield Cli(url, stub.token, tmp_path)


# -- the stub honours the contract -----------------------------------------------------------------------------


def test_stub_answers_problem_json_and_needs_the_bearer_token(stub):
    with serve(stub.app) as url:
        anon = httpx.get(f"{url}/v1/flavors")
        assert anon.status_code == 401
        assert anon.headers["content-type"].startswith("application/problem+json")
        assert set(anon.json()) == {"type", "title", "status", "detail"}
        assert httpx.get(f"{url}/metrics").status_code == 200
        auth = {"Authorization": f"Bearer {stub.token}"}
        missing = httpx.get(f"{url}/v1/vms/nope", headers=auth)
        assert missing.status_code == 404 and missing.json()["status"] == 404


def test_stub_flavor_vm_and_exec_shapes_match_the_contract(stub):
    flavor_keys = {"name", "kernel", "initrd", "cmdline_extra", "vcpus", "mem_mib", "pool_min", "pool_target",
                   "max_age_s", "clone", "template", "created_at", "updated_at"}
    vm_keys = {"id", "flavor", "state", "pid", "api_socket", "created_at", "ready_at", "claimed_at", "stopped_at",
               "boot_ms", "failure_reason", "source", "template"}
    with serve(stub.app) as url:
        auth = {"Authorization": f"Bearer {stub.token}"}
        created = httpx.post(f"{url}/v1/flavors", json={"name": "small", "vcpus": 1, "mem_mib": 128}, headers=auth)
        assert created.status_code == 201 and set(created.json()) == flavor_keys
        again = httpx.post(f"{url}/v1/flavors", json={"name": "small"}, headers=auth)
        assert again.status_code == 409
        pool = httpx.get(f"{url}/v1/pools/small", headers=auth).json()
        assert set(pool) == {"flavor", "target", "min", "ready", "booting", "claimed", "state", "reason"}
        empty = httpx.post(f"{url}/v1/vms", json={"flavor": "small", "wait": False}, headers=auth)
        assert empty.status_code == 503 and empty.headers["retry-after"]
        vm = httpx.post(f"{url}/v1/vms", json={"flavor": "small", "wait": True}, headers=auth)
        assert vm.status_code == 201 and set(vm.json()) == vm_keys | {"claim"} and vm.json()["claim"] == "miss"
        assert set(vm.json()["boot_ms"]) == {"vmm_setup", "kernel", "init_to_agent", "total"}
        result = httpx.post(f"{url}/v1/vms/{vm.json()['id']}/exec", json={"argv": ["echo", "hi"]}, headers=auth)
        assert set(result.json()) == {"exit_code", "signal", "timed_out", "stdout_b64", "stderr_b64",
                                      "stdout_truncated", "stderr_truncated", "duration_ms"}
        names = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{url}/metrics").text.splitlines()
                 if line and not line.startswith("#")}
        assert {"pclite_boot_phase_seconds_bucket", "pclite_claims_total", "pclite_claim_seconds_bucket"} <= names
