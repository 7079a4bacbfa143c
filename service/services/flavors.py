"""Flavor CRUD: validation beyond the schema (paths, quotas) and the generation bump that retires stale VMs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import select

from service.core.config import Settings
from service.core.db import Database
from service.models import Flavor, utcnow
from service.schemas import NAME_PATTERN, FlavorPatch, FlavorSpec
from service.services.errors import Conflict, Invalid, QuotaExceeded
from service.services.inventory import add_event, unknown_flavor

BOOT_FIELDS = ("kernel", "initrd", "cmdline_extra", "vcpus", "mem_mib")  # what a booted VM is made of


def _check_file(field: str, value: str | None) -> None:
    if value is None:
        return
    path = Path(value)
    if not path.is_absolute():
        raise Invalid(f"{field} {value!r} must be an absolute path (or null for the built-in {field})")
    if not path.is_file():
        raise Invalid(f"{field} {value!r} does not exist or is not a file on the pclited host; "
                      f"give an existing file, or null for the built-in {field}")
    if not os.access(path, os.R_OK):
        raise Invalid(f"{field} {value!r} is not readable by pclited")


class FlavorService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    def list(self) -> list[Flavor]:
        with self.db.read() as s:
            return list(s.scalars(select(Flavor).order_by(Flavor.name)))

    def get(self, name: str) -> Flavor:
        with self.db.read() as s:
            flavor = s.get(Flavor, name)
        if flavor is None:
            raise unknown_flavor(name)
        return flavor

    def _validate(self, values: dict) -> None:
        _check_file("kernel", values["kernel"])
        _check_file("initrd", values["initrd"])
        if values["pool_min"] > values["pool_target"]:
            raise Invalid(f"pool_min ({values['pool_min']}) must not exceed pool_target ({values['pool_target']})")
        self.check_pool_quota(values["name"], values["pool_target"], values["mem_mib"])

    def check_pool_quota(self, name: str, target: int, mem_mib: int) -> None:
        s = self.settings
        if target > s.max_vms:
            raise QuotaExceeded(f"pool {name}: target {target} exceeds the VM quota ({s.max_vms}); "
                                "lower the target or raise PCLITE_MAX_VMS")
        if target * mem_mib > s.max_guest_mem_mib:
            raise QuotaExceeded(f"pool {name}: target {target} × {mem_mib} MiB = {target * mem_mib} MiB exceeds the "
                                f"guest memory quota ({s.max_guest_mem_mib} MiB); lower the target or mem_mib, or "
                                "raise PCLITE_MAX_GUEST_MEM_MIB")

    def create(self, spec: FlavorSpec, *, dry_run: bool = False) -> Flavor:
        """A new flavor; with dry_run, every check is made and the flavor it would be is returned, unsaved."""
        if not spec.name:
            raise Invalid("name is required: a DNS label such as 'small' (a-z, 0-9, '-')")
        values = spec.model_dump()
        self._validate(values)
        with self.db.write() as s:
            if s.get(Flavor, spec.name) is not None:
                raise Conflict(f"flavor {spec.name!r} already exists: change it with PUT or PATCH "
                               f"/v1/flavors/{spec.name}")
            now = utcnow()
            flavor = Flavor(**values, generation=1, created_at=now, updated_at=now)
            if dry_run:
                return flavor
            s.add(flavor)
            add_event(s, "flavor.created", f"flavor {spec.name} created", flavor=spec.name)
        return flavor

    def replace(self, name: str, spec: FlavorSpec, *, dry_run: bool = False) -> tuple[Flavor, bool]:
        """PUT: create or replace; returns (flavor, created). With dry_run, what it would be, nothing written."""
        if not re.fullmatch(NAME_PATTERN, name):
            raise Invalid(f"flavor name {name[:80]!r} is not a DNS label: use a-z, 0-9 and '-', at most 63 characters")
        if spec.name not in (None, name):
            raise Invalid(f"body name {spec.name!r} does not match the URL's {name!r}; omit it or make them equal")
        values = spec.model_dump() | {"name": name}
        self._validate(values)
        with self.db.write() as s:
            flavor = s.get(Flavor, name)
            if flavor is None:
                now = utcnow()
                flavor = Flavor(**values, generation=1, created_at=now, updated_at=now)
                if dry_run:
                    return flavor, True
                s.add(flavor)
                add_event(s, "flavor.created", f"flavor {name} created", flavor=name)
                return flavor, True
            if dry_run:
                return self._preview(flavor, values), False
            self._apply(s, flavor, values)
        return flavor, False

    @staticmethod
    def _preview(flavor: Flavor, values: dict) -> Flavor:
        """The flavor an update would leave, as a new unsaved object (the stored one is left untouched)."""
        columns = {c.key: getattr(flavor, c.key) for c in Flavor.__table__.columns}
        keep = {k: columns[k] for k in ("name", "created_at", "generation")}
        return Flavor(**(columns | values | keep | {"updated_at": utcnow()}))

    def patch(self, name: str, patch: FlavorPatch, *, dry_run: bool = False) -> Flavor:
        changes = patch.model_dump(exclude_unset=True)
        for field in ("vcpus", "mem_mib", "pool_min", "pool_target", "max_age_s", "cmdline_extra", "clone"):
            if field in changes and changes[field] is None:
                raise Invalid(f"{field} cannot be null")
        with self.db.write() as s:
            flavor = s.get(Flavor, name)
            if flavor is None:
                raise unknown_flavor(name)
            values = {c.key: getattr(flavor, c.key) for c in Flavor.__table__.columns} | changes
            self._validate(values)
            if dry_run:
                return self._preview(flavor, values)
            self._apply(s, flavor, values)
        return flavor

    def set_target(self, name: str, target: int) -> Flavor:
        with self.db.write() as s:
            flavor = s.get(Flavor, name)
            if flavor is None:
                raise unknown_flavor(name)
            if target < flavor.pool_min:
                raise Invalid(f"target {target} is below the pool's min ({flavor.pool_min}); lower pool_min first "
                              f"(PATCH /v1/flavors/{name} {{\"pool_min\": {target}}})")
            self.check_pool_quota(name, target, flavor.mem_mib)
            if target != flavor.pool_target:
                add_event(s, "pool.target", f"pool target {flavor.pool_target} → {target}", flavor=name)
            flavor.pool_target = target
            flavor.updated_at = utcnow()
        return flavor

    def _apply(self, s, flavor: Flavor, values: dict) -> None:
        boot_changed = any(getattr(flavor, f) != values[f] for f in BOOT_FIELDS)
        for key, value in values.items():
            if key not in ("name", "created_at", "updated_at", "generation"):
                setattr(flavor, key, value)
        if boot_changed:
            flavor.generation += 1  # pooled VMs of the old spec get retired by the pool manager
        flavor.updated_at = utcnow()
        add_event(s, "flavor.updated", f"flavor {flavor.name} updated" +
                  (" (boot spec changed: pooled VMs will be replaced)" if boot_changed else ""), flavor=flavor.name)

    def delete(self, name: str) -> Flavor:
        with self.db.write() as s:
            flavor = s.get(Flavor, name)
            if flavor is None:
                raise unknown_flavor(name)
            s.delete(flavor)
            add_event(s, "flavor.deleted", f"flavor {name} deleted; its pool is stopping", flavor=name)
        return flavor
