"""pclited: the pclite control plane (warm microVM pools behind a REST API).

  pclited [serve] [--config FILE]   migrate the database, then serve (default)
  pclited migrate [--config FILE]   apply the database migrations and exit

VMMs run detached: stopping (or losing) pclited leaves VMs running, and the next start adopts them by pid and
socket, closes the books on the dead ones and kills VMMs nobody owns. PCLITE_VMM_DETACH=false: VMMs stop with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI

from service.api import errors, openapi
from service.api.middleware import Guard
from service.api.observe import RequestMetrics
from service.api.routes import flavors, health, pools, vms
from service.auth import BadToken, ensure_token, write_client_config
from service.core.config import Settings, load_settings
from service.core.db import Database, upgrade

log = logging.getLogger("pclited")


def create_app(settings: Settings, token: str, db: Database | None = None) -> FastAPI:
    from service.services.node import Node

    node = Node(settings, db)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # DB calls and VMM waits run in threads; the default pool (cpus + 4) would queue concurrent claims.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="pclited"))
        await node.start()
        try:
            yield
        finally:
            await node.stop()
            if settings.unix_socket:  # here, not after run(): uvicorn re-raises SIGTERM once it has shut down
                settings.unix_socket.unlink(missing_ok=True)

    # No /docs UI: every page but the probes needs the token, which a browser would not send.
    app = FastAPI(title="pclited", version=health.pclite_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Warm pools of pclite microVMs: claim a ready VM in milliseconds.",
                  generate_unique_id_function=openapi.operation_id)
    app.state.node = node
    errors.install(app)
    for module in (flavors, pools, vms, health):
        app.include_router(module.router)
    hint = "use the token from --config/PCLITE_TOKEN" if settings.token else f"the token is in {settings.token_path}"
    app.add_middleware(Guard, token=token, token_hint=hint)
    app.add_middleware(RequestMetrics, fastapi_app=app, metrics=node.metrics)
    node.metrics.set_version(app.version)
    openapi.install(app)
    return app


def _tcp_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _unix_socket(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # stale from a previous run
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)  # the token still applies; this keeps other users off entirely
    sock.listen(1024)
    return sock


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def migrate(settings: Settings) -> Database:
    db = Database(settings.database_url)
    upgrade(db)
    return db


def serve(settings: Settings) -> int:
    import uvicorn

    # Claims hop between the event loop and DB threads: a 5 ms GIL slice would dominate their latency.
    sys.setswitchinterval(0.001)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = ensure_token(settings)  # a refused token stops pclited before it touches the database
    db = migrate(settings)
    sockets = [_tcp_socket(settings.host, settings.port)]
    host, port = sockets[0].getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{port}"
    if settings.unix_socket:
        sockets.append(_unix_socket(settings.unix_socket))
    if settings.write_client_config:
        write_client_config(settings.client_config, url, token)
    app = create_app(settings, token, db)
    log.info("listening on %s%s (data in %s)", url,
             f" and unix:{settings.unix_socket}" if settings.unix_socket else "", settings.data_dir)
    config = uvicorn.Config(app, log_level=settings.log_level.lower(), access_log=settings.access_log,
                            lifespan="on", timeout_graceful_shutdown=5, log_config=None)
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pclited", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate"))
    parser.add_argument("--config", metavar="FILE", help="YAML settings (default $PCLITE_CONFIG_FILE, "
                                                         "/etc/pclite/pclited.yaml); PCLITE_* variables override it")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pclited: bad configuration: {exc}", file=sys.stderr)
        return 2
    _logging(settings)
    try:
        if args.command == "migrate":
            migrate(settings).dispose()
            log.info("database migrated to head")
            return 0
        return serve(settings)
    except BadToken as exc:
        print(f"pclited: bad configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
