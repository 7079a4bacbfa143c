"""The VM inventory in the database: every state change is one short transaction with its event.

Transitions are compare-and-set (`WHERE state IN (...)`): whoever changes a VM's state first wins, so a VM is
claimed once and a stop, a crash and a boot failure can never both be recorded.
"""

from __future__ import annotations

import secrets
from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import Row, String, bindparam, delete, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.config import Settings
from service.core.db import Database
from service.models import (
    CLAIMED,
    CLONE,
    COLD,
    LIVE_STATES,
    READY,
    TERMINAL_STATES,
    VM,
    Event,
    Flavor,
    IdempotencyKey,
    UTCDateTime,
    utcnow,
)
from service.services.errors import NotFound, QuotaExceeded


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(6)


_VMS, _FLAVORS, _EVENTS = VM.__table__, Flavor.__table__, Event.__table__
_NOW = bindparam("now", type_=UTCDateTime())
HIT = "claimed from the pool (hit)"
UNSETTLED_S = 900.0  # longer than any claim (a cold boot waits at most boot_timeout_s)
_PICK = (select(_VMS.c.id).join(_FLAVORS, _FLAVORS.c.name == _VMS.c.flavor)
         .where(_VMS.c.flavor == bindparam("flavor_name"), _VMS.c.state == READY,
                _VMS.c.flavor_generation == _FLAVORS.c.generation)
         .order_by(_VMS.c.ready_at, _VMS.c.id).limit(1))

# SQLite: pick, take, log in one (serialized) transaction; in-process, three statements cost little.
_TAKE = (update(_VMS).where(_VMS.c.id == bindparam("vm_id"), _VMS.c.state == READY)
         .values(state=CLAIMED, claimed_at=_NOW).returning(*_VMS.c))
_LOG = insert(_EVENTS)
# PostgreSQL: one statement, one round trip; SKIP LOCKED makes concurrent claims take different rows.
_picked = _PICK.with_for_update(of=_VMS, skip_locked=True).cte("picked")
_taken = (update(_VMS).where(_VMS.c.id == _picked.c.id, _VMS.c.state == READY)
          .values(state=CLAIMED, claimed_at=_NOW).returning(*_VMS.c).cte("taken"))
_logged = insert(_EVENTS).from_select(
    ["vm_id", "flavor", "kind", "message", "at"],
    select(_taken.c.id, _taken.c.flavor, literal("vm.claimed", String), literal(HIT, String), _NOW)).cte("logged")
_CLAIM_ONE = select(_taken).add_cte(_logged)


def add_event(session: Session, kind: str, message: str, vm_id: str | None = None,
              flavor: str | None = None) -> None:
    session.add(Event(vm_id=vm_id, flavor=flavor, kind=kind, message=message[:4000], at=utcnow()))


def unknown_flavor(name: str) -> NotFound:
    return NotFound(f"no flavor named {name!r}: list them with GET /v1/flavors or create it with POST /v1/flavors")


class Inventory:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    # --- reads ----------------------------------------------------------------------------------------------
    def get(self, vm_id: str) -> VM:
        with self.db.read() as s:
            vm = s.get(VM, vm_id)
        if vm is None:
            raise NotFound(f"no VM {vm_id!r}: list VMs with GET /v1/vms")
        return vm

    def list(self, flavor: str | None = None, state: str | None = None) -> list[VM]:
        query = select(VM).order_by(VM.created_at, VM.id)
        if flavor:
            query = query.where(VM.flavor == flavor)
        if state:
            query = query.where(VM.state == state)
        with self.db.read() as s:
            return list(s.scalars(query))

    def page(self, flavor: str | None, state: str | None, keep, limit: int | None,
             after: tuple[datetime, str] | None) -> tuple[list[VM], bool]:
        """VMs in list order after the (created_at, id) `after`, those `keep(vm)` accepts, at most `limit`;
        (vms, more): more when VMs past them remain."""
        query = select(VM).order_by(VM.created_at, VM.id)
        if flavor:
            query = query.where(VM.flavor == flavor)
        if state:
            query = query.where(VM.state == state)
        if after is not None:
            query = query.where(or_(VM.created_at > after[0], (VM.created_at == after[0]) & (VM.id > after[1])))
        found: list[VM] = []
        with self.db.read() as s:
            for vm in s.scalars(query):
                if keep(vm):
                    if limit is not None and len(found) == limit:
                        return found, True
                    found.append(vm)
        return found, False

    def expired(self) -> list[str]:
        """Claimed VMs whose lease has ended."""
        with self.db.read() as s:
            return list(s.scalars(select(VM.id).where(VM.state == CLAIMED, VM.expires_at.is_not(None),
                                                      VM.expires_at <= utcnow())))

    def last_event_id(self) -> int:
        with self.db.read() as s:
            return s.execute(select(func.coalesce(func.max(Event.id), 0))).scalar_one()

    def events_after(self, event_id: int, limit: int = 500) -> list[tuple[int, str | None, str]]:
        """(id, vm_id, kind) of the events after event_id: what a watch turns into ADDED/MODIFIED/DELETED."""
        with self.db.read() as s:
            return list(s.execute(select(Event.id, Event.vm_id, Event.kind).where(Event.id > event_id)
                                  .order_by(Event.id).limit(limit)).tuples())

    def find(self, vm_id: str) -> VM | None:
        with self.db.read() as s:
            return s.get(VM, vm_id)

    def live(self) -> list[VM]:
        with self.db.read() as s:
            return list(s.scalars(select(VM).where(VM.state.in_(LIVE_STATES)).order_by(VM.created_at)))

    def live_brief(self) -> list:
        """Live VMs as light rows (no ORM objects): what the loops that run several times a second need."""
        columns = (VM.id, VM.flavor, VM.flavor_generation, VM.pooled, VM.state, VM.pid, VM.api_socket,
                   VM.console_path, VM.created_at, VM.ready_at, VM.source, VM.template, VM.mem_mib)
        with self.db.read() as s:
            return list(s.execute(select(*columns).where(VM.state.in_(LIVE_STATES)).order_by(VM.created_at)))

    def events(self, vm_id: str) -> list[Event]:
        self.get(vm_id)
        with self.db.read() as s:
            return list(s.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.id)))

    def state_counts(self) -> dict[str, int]:
        with self.db.read() as s:
            return dict(s.execute(select(VM.state, func.count()).group_by(VM.state)).tuples().all())

    def flavor_state_counts(self) -> dict[tuple[str, str], int]:
        """{(flavor, state): VMs} over the whole inventory (for pclite_vms)."""
        with self.db.read() as s:
            rows = s.execute(select(VM.flavor, VM.state, func.count()).group_by(VM.flavor, VM.state)).tuples().all()
        return {(flavor, state): n for flavor, state, n in rows}

    def pool_counts(self) -> dict[str, Counter]:
        """{flavor: Counter(state → live VMs)}."""
        with self.db.read() as s:
            rows = s.execute(select(VM.flavor, VM.state, func.count()).where(VM.state.in_(LIVE_STATES))
                             .group_by(VM.flavor, VM.state)).tuples().all()
        counts: dict[str, Counter] = {}
        for flavor, state, n in rows:
            counts.setdefault(flavor, Counter())[state] = n
        return counts

    # --- writes ---------------------------------------------------------------------------------------------
    def new_vm(self, flavor: Flavor, *, pooled: bool, template: str | None = None) -> VM:
        """A booting VM row (before its VMM exists: a crash in between leaves a row, never an unknown process)."""
        s_ = self.settings
        with self.db.write() as s:
            self.db.lock_quota(s)
            count, mem = s.execute(select(func.count(), func.coalesce(func.sum(VM.mem_mib), 0))
                                   .where(VM.state.in_(LIVE_STATES))).one()
            if count + 1 > s_.max_vms:
                raise QuotaExceeded(f"VM quota reached: {count} of max {s_.max_vms} VMs are running or booting; "
                                    "delete VMs (DELETE /v1/vms/{id}), lower pool targets, or raise PCLITE_MAX_VMS")
            if mem + flavor.mem_mib > s_.max_guest_mem_mib:
                raise QuotaExceeded(f"guest memory quota reached: {mem} MiB in use + {flavor.mem_mib} MiB for a "
                                    f"{flavor.name} VM > max {s_.max_guest_mem_mib} MiB; delete VMs, lower pool "
                                    "targets, or raise PCLITE_MAX_GUEST_MEM_MIB")
            vm_id = new_vm_id()
            vm = VM(id=vm_id, flavor=flavor.name, flavor_generation=flavor.generation, pooled=pooled,
                    state="booting", vcpus=flavor.vcpus, mem_mib=flavor.mem_mib,
                    source=CLONE if template else COLD, template=template,
                    api_socket=str(s_.run_dir / f"{vm_id}.sock"),
                    console_path=str(s_.vm_dir / vm_id / "console.log"), created_at=utcnow())
            s.add(vm)
            how = f"restoring a clone of template {template}" if template else "cold boot"
            add_event(s, "vm.booting", f"{how} for the pool" if pooled else f"{how} for a claim", vm_id, flavor.name)
        return vm

    def no_room_for(self, mem_mib: int) -> str | None:
        """Why one more VM of mem_mib would exceed the quotas, or None (a template VM: not a row, but it runs)."""
        with self.db.read() as s:
            count, mem = s.execute(select(func.count(), func.coalesce(func.sum(VM.mem_mib), 0))
                                   .where(VM.state.in_(LIVE_STATES))).one()
        if count + 1 > self.settings.max_vms:
            return f"{count} of max {self.settings.max_vms} VMs are running or booting (PCLITE_MAX_VMS)"
        if mem + mem_mib > self.settings.max_guest_mem_mib:
            return (f"{mem} MiB of guest memory in use + {mem_mib} MiB > max {self.settings.max_guest_mem_mib} MiB "
                    "(PCLITE_MAX_GUEST_MEM_MIB)")
        return None

    def claim(self, flavor_name: str) -> tuple[Row | None, Flavor | None]:
        """Atomically take the oldest ready VM of the flavor's current spec: (vm, None) on a hit, (None, flavor)
        when there is none. Prebuilt Core statements: the claim latency is mostly this."""
        params = {"flavor_name": flavor_name, "now": utcnow()}
        if self.db.backend == "postgresql":
            with self.db.autocommit() as conn:
                vm = conn.execute(_CLAIM_ONE, params).first()
            return (vm, None) if vm is not None else (None, self.flavor_or_404(flavor_name))
        with self.db.write_core() as conn:
            vm_id = conn.execute(_PICK, params).scalar()  # writers are serialized: nobody else can take it
            vm = conn.execute(_TAKE, params | {"vm_id": vm_id}).first() if vm_id else None
            if vm is not None:
                conn.execute(_LOG, {"vm_id": vm_id, "flavor": flavor_name, "kind": "vm.claimed", "message": HIT,
                                    "at": params["now"]})
                return vm, None
        return None, self.flavor_or_404(flavor_name)

    def flavor_or_404(self, name: str) -> Flavor:
        with self.db.read() as s:
            flavor = s.get(Flavor, name)
        if flavor is None:
            raise unknown_flavor(name)
        return flavor

    def transition(self, vm_id: str, from_states: tuple[str, ...], to_state: str,
                   events: list[tuple[str, str]], **fields) -> VM | None:
        """Compare-and-set the state (plus fields) and log events; None if the VM was not in from_states."""
        with self.db.write() as s:
            done = s.execute(update(VM).where(VM.id == vm_id, VM.state.in_(from_states))
                             .values(state=to_state, **fields))
            if done.rowcount != 1:
                return None
            vm = s.execute(select(VM).where(VM.id == vm_id).execution_options(populate_existing=True)).scalar_one()
            for kind, message in events:
                add_event(s, kind, message, vm_id, vm.flavor)
            return vm

    def update(self, vm_id: str, **fields) -> None:
        with self.db.write() as s:
            s.execute(update(VM).where(VM.id == vm_id).values(**fields))

    def patch(self, vm_id: str, kind: str, message: str, **fields) -> VM:
        """Change a VM's lease or labels and log why (so watches see a MODIFIED)."""
        with self.db.write() as s:
            vm = s.get(VM, vm_id)
            if vm is None:
                raise NotFound(f"no VM {vm_id!r}: list VMs with GET /v1/vms")
            for name, value in fields.items():
                setattr(vm, name, value)
            add_event(s, kind, message, vm_id, vm.flavor)
        return vm

    # --- idempotency keys -------------------------------------------------------------------------------------
    def reserve_key(self, key: str, request_hash: str, max_age_s: float) -> IdempotencyKey | None:
        """Take the key for this request (None), or the record of the request that took it first."""
        now = utcnow()
        with self.db.write() as s:
            # Expired keys, and reservations a claim never settled (pclited died mid-claim): free again.
            s.execute(delete(IdempotencyKey).where(or_(
                IdempotencyKey.created_at < now - timedelta(seconds=max_age_s),
                IdempotencyKey.vm_id.is_(None) & (IdempotencyKey.created_at < now - timedelta(seconds=UNSETTLED_S)))))
        try:
            with self.db.write() as s:
                s.add(IdempotencyKey(key=key, request_hash=request_hash, created_at=utcnow()))
            return None
        except IntegrityError:
            with self.db.read() as s:
                return s.get(IdempotencyKey, key)

    def settle_key(self, key: str, vm_id: str | None, hit: bool | None) -> None:
        """Record what the key's request answered; no vm_id: it failed, the key is free again."""
        with self.db.write() as s:
            if vm_id is None:
                s.execute(delete(IdempotencyKey).where(IdempotencyKey.key == key))
            else:
                s.execute(update(IdempotencyKey).where(IdempotencyKey.key == key)
                          .values(vm_id=vm_id, hit=hit))

    def event(self, kind: str, message: str, vm_id: str | None = None, flavor: str | None = None) -> None:
        with self.db.write() as s:
            add_event(s, kind, message, vm_id, flavor)

    def prune(self, retention_s: float) -> list[VM]:
        """Forget stopped/failed VMs older than the retention; their events stay."""
        cutoff: datetime = utcnow() - timedelta(seconds=retention_s)
        with self.db.write() as s:
            old = list(s.scalars(select(VM).where(VM.state.in_(TERMINAL_STATES), VM.stopped_at < cutoff)))
            if old:
                s.execute(delete(VM).where(VM.id.in_([vm.id for vm in old])))
            return old
