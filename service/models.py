"""SQLAlchemy models: the inventory that outlives pclited (flavors, VMs, their lifecycle events)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Index, Integer, String, Text, TypeDecorator, true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The VM state machine: booting → ready → claimed → stopping → stopped, and failed from any live state.
BOOTING, READY, CLAIMED, STOPPING, STOPPED, FAILED = "booting", "ready", "claimed", "stopping", "stopped", "failed"
VM_STATES = (BOOTING, READY, CLAIMED, STOPPING, STOPPED, FAILED)
LIVE_STATES = (BOOTING, READY, CLAIMED, STOPPING)  # a VMM process exists (or should) and counts against quotas
TERMINAL_STATES = (STOPPED, FAILED)
# How a VM was made: booted from its kernel, or restored from its flavor's template snapshot.
COLD, CLONE = "cold", "clone"
SOURCES = (COLD, CLONE)
# A clone flavor's template (pclited's memory, services/templates.py): disabled, pending, building, ready, failed.
TEMPLATE_STATES = ("disabled", "pending", "building", "ready", "failed")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Flavor(Base):
    __tablename__ = "flavors"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    kernel: Mapped[str | None] = mapped_column(String(4096))
    initrd: Mapped[str | None] = mapped_column(String(4096))
    cmdline_extra: Mapped[str] = mapped_column(String(1024), default="")
    vcpus: Mapped[int] = mapped_column(Integer)
    mem_mib: Mapped[int] = mapped_column(Integer)
    pool_min: Mapped[int] = mapped_column(Integer, default=0)
    pool_target: Mapped[int] = mapped_column(Integer, default=0)
    max_age_s: Mapped[int] = mapped_column(Integer, default=0)
    # Refill the pool from clones of a template VM snapshotted at agent-ready (cold boots are the fallback).
    clone: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # Bumped when what a VM boots changes (kernel, initrd, cmdline, size): older pooled VMs get retired.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class VM(Base):
    __tablename__ = "vms"
    __table_args__ = (Index("ix_vms_flavor_state", "flavor", "state"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    # A name, not a foreign key: claimed VMs and their history outlive a deleted flavor.
    flavor: Mapped[str] = mapped_column(String(63))
    flavor_generation: Mapped[int] = mapped_column(Integer, default=1)
    pooled: Mapped[bool] = mapped_column(Boolean, default=True)  # False: cold-booted for one claim
    source: Mapped[str] = mapped_column(String(8), default=COLD, server_default=COLD)
    # The template snapshot directory (its name under data_dir/templates) a clone maps: kept while VMs use it.
    template: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), index=True)
    vcpus: Mapped[int] = mapped_column(Integer)
    mem_mib: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    api_socket: Mapped[str] = mapped_column(String(255))
    console_path: Mapped[str] = mapped_column(String(4096))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    boot_ms: Mapped[dict | None] = mapped_column(JSON)
    timeline_ms: Mapped[dict | None] = mapped_column(JSON)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # Kubernetes-style labels ({key: value}); selectors filter on them (services/labels.py).
    labels: Mapped[dict | None] = mapped_column(JSON)
    # A claim's lease: past it the supervisor stops the VM (vm.expired). None: no lease.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_id: Mapped[str | None] = mapped_column(String(16), index=True)
    flavor: Mapped[str | None] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class IdempotencyKey(Base):
    """A claim's Idempotency-Key: a retry with the same key and body gets the same VM for a day."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    vm_id: Mapped[str | None] = mapped_column(String(16))  # None while the first request is still claiming
    hit: Mapped[bool | None] = mapped_column(Boolean)  # the first answer's claim: hit (pool) or miss (boot)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
