"""The database: one engine, short transactions, and the per-backend settings that make claims safe."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_read_only = contextvars.ContextVar("pclite_read_only", default=False)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (psycopg2 is not a dependency)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Database:
    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.backend = make_url(self.url).get_backend_name()
        if self.is_sqlite:
            path = make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False},
                                        pool_size=16, max_overflow=32)
            _sqlite_transactions(self.engine, wal=not (path and on_network_fs(Path(path).parent)))
        else:
            # No pre-ping: a round trip per checkout would double a claim's cost; dead connections get recycled.
            self.engine = create_engine(self.url, pool_recycle=3600, pool_size=16, max_overflow=32)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = threading.RLock() if self.is_sqlite else contextlib.nullcontext()

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that may write: serialized on SQLite (BEGIN IMMEDIATE), so a read-then-update never races.
        Our writers queue on a lock first: SQLite's busy handler would make them sleep in growing steps instead."""
        with self._writer, self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def write_core(self) -> Iterator[Connection]:
        """write() without the ORM, for the claim hot path (Core statements built once)."""
        with self._writer, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """One statement, its own transaction: no BEGIN/COMMIT round trips (PostgreSQL claims)."""
        with self.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        token = _read_only.set(True)
        try:
            with self._sessions.begin() as session:
                yield session
        finally:
            _read_only.reset(token)

    def lock_quota(self, session: Session) -> None:
        """Serialize check-then-insert of VMs (quotas). SQLite already is, by BEGIN IMMEDIATE."""
        if self.backend == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(7236014)"))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


NETWORK_FS = ("9p", "nfs", "nfs4", "cifs", "smb3", "virtiofs", "fuse")


def on_network_fs(path: Path, mounts_text: str | None = None) -> bool:
    """WAL needs shared memory that network/virtual filesystems (a 9p share into the lab, NFS) do not give."""
    try:
        text = Path("/proc/self/mounts").read_text() if mounts_text is None else mounts_text
    except OSError:
        return False
    mounts = [line.split() for line in text.splitlines()]
    target = str(path.resolve())
    best = max((m for m in mounts if len(m) > 2 and (target == m[1] or target.startswith(m[1].rstrip("/") + "/"))),
               key=lambda m: len(m[1]), default=None)
    return best is not None and best[2].split(".")[0] in NETWORK_FS


def _sqlite_transactions(engine: Engine, wal: bool) -> None:
    """WAL + our own BEGIN: pysqlite's legacy mode would start a write only at the first UPDATE, where a
    concurrent writer makes it fail with 'database is locked' instead of waiting."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=" + ("WAL" if wal else "DELETE"))
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN" if _read_only.get() else "BEGIN IMMEDIATE")


def upgrade(db: Database, revision: str = "head") -> None:
    _alembic(db, "upgrade", revision)


def downgrade(db: Database, revision: str = "base") -> None:
    _alembic(db, "downgrade", revision)


def _alembic(db: Database, verb: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        getattr(command, verb)(config, revision)
