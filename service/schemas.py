"""The REST contract: request and response bodies (pydantic). Limits here are what 4xx answers quote."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hypervisor import vmm_api

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
MIN_MEM_MIB, MAX_MEM_MIB = 64, 262144  # below 64 MiB the guest kernel + agent do not fit; 256 GiB is absurd here
MAX_VCPUS = 64  # the VMM's limit
MAX_POOL = 256
MAX_AGE_S = 30 * 86400
MAX_CMDLINE_EXTRA = 1024
MAX_EXEC_STDIN = vmm_api.MAX_EXEC_STDIN
MAX_TTL_S = 30 * 86400
VMState = Literal["booting", "ready", "claimed", "stopping", "stopped", "failed"]
VMSource = Literal["cold", "clone"]

VM_ID_PATTERN = r"^vm-[a-z0-9-]{1,60}$"
# What guestboot.cmdline.encode_cmdline accepts: printable ASCII (a refused flavor would fail every boot).
CMDLINE_PATTERN = r"^[ -~]*$"


class _In(BaseModel):
    # extra: a misspelt field is an error, not silently ignored; strict: no false for 0 nor 0 for false.
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_cmdline(value: str) -> str:
    from guestboot.cmdline import encode_cmdline
    from guestboot.plan import LoaderError

    try:
        encode_cmdline(value, MAX_CMDLINE_EXTRA)
    except LoaderError as exc:
        raise ValueError("cmdline_extra must be one line of printable ASCII: "
                         + str(exc).replace("kernel command line ", "", 1)) from None
    return value.strip()


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


def _cmdline_schema(schema: dict) -> None:
    schema["pattern"] = CMDLINE_PATTERN  # the validator checks it, with a clearer message than a pattern's
    _no_default(schema)


def _optional(**constraints):
    """A PATCH field: may be left out, never null (the service refuses null; the schema says so)."""
    return Field(None, json_schema_extra=_no_default, **constraints)


class FlavorSpec(_In):
    """POST /v1/flavors and PUT /v1/flavors/{name} (name optional there; it must match the path)."""

    name: str | None = Field(None, pattern=NAME_PATTERN, max_length=63, description="DNS label: a-z, 0-9, '-'")
    kernel: str | None = Field(None, max_length=4096, description="absolute path; null = the built-in kernel")
    initrd: str | None = Field(None, max_length=4096, description="absolute path; null = the built-in initramfs")
    cmdline_extra: str = Field("", max_length=MAX_CMDLINE_EXTRA, json_schema_extra={"pattern": CMDLINE_PATTERN},
                               description="appended to the kernel command line: printable ASCII")
    vcpus: int = Field(1, ge=1, le=MAX_VCPUS)
    mem_mib: int = Field(256, ge=MIN_MEM_MIB, le=MAX_MEM_MIB)
    pool_min: int = Field(0, ge=0, le=MAX_POOL)
    pool_target: int = Field(1, ge=0, le=MAX_POOL)
    max_age_s: int = Field(3600, ge=0, le=MAX_AGE_S, description="retire pooled VMs older than this; 0 = never")
    clone: bool = Field(True, description="refill the pool from clones of a template VM snapshotted at agent-ready "
                                          "(cold boots remain the fallback); false = cold boots only")

    _cmdline = field_validator("cmdline_extra")(_check_cmdline)

    @model_validator(mode="after")
    def _min_le_target(self):
        if self.pool_min > self.pool_target:
            raise ValueError(f"pool_min ({self.pool_min}) must not exceed pool_target ({self.pool_target})")
        return self


class FlavorPatch(_In):
    kernel: str | None = Field(None, max_length=4096)
    initrd: str | None = Field(None, max_length=4096)
    cmdline_extra: str = Field(None, max_length=MAX_CMDLINE_EXTRA, json_schema_extra=_cmdline_schema)
    vcpus: int = _optional(ge=1, le=MAX_VCPUS)
    mem_mib: int = _optional(ge=MIN_MEM_MIB, le=MAX_MEM_MIB)
    pool_min: int = _optional(ge=0, le=MAX_POOL)
    pool_target: int = _optional(ge=0, le=MAX_POOL)
    max_age_s: int = _optional(ge=0, le=MAX_AGE_S)
    clone: bool = _optional()

    _cmdline = field_validator("cmdline_extra")(_check_cmdline)


TemplateState = Literal["disabled", "pending", "building", "ready", "failed"]


class TemplateOut(BaseModel):
    """A clone flavor's template: the snapshot its pool is refilled from (pclited's view, not stored)."""

    state: TemplateState
    key: str | None = Field(None, description="hash of everything that changes the guest (kernel, initrd, size...)")
    dir: str | None = None
    built_at: datetime | None = None
    build_ms: float | None = None
    error: str | None = Field(None, description="why the last build or restore failed")
    failures: int = Field(0, description="consecutive build or restore failures of this spec")
    retry_in_s: float | None = None


class FlavorOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    kernel: str | None
    initrd: str | None
    cmdline_extra: str
    vcpus: int
    mem_mib: int
    pool_min: int
    pool_target: int
    max_age_s: int
    clone: bool
    created_at: datetime
    updated_at: datetime
    template: TemplateOut | None = None


class PoolOut(BaseModel):
    flavor: str
    target: int
    min: int
    ready: int
    booting: int
    claimed: int
    state: Literal["ok", "degraded"]
    reason: str | None


class PoolPatch(_In):
    target: int = Field(ge=0, le=MAX_POOL)


class BootMs(BaseModel):
    vmm_setup: float | None
    kernel: float | None
    init_to_agent: float | None
    total: float | None


class VMOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    flavor: str
    state: VMState
    pid: int | None
    api_socket: str
    created_at: datetime
    ready_at: datetime | None
    claimed_at: datetime | None
    stopped_at: datetime | None
    boot_ms: BootMs | None
    failure_reason: str | None
    source: VMSource = Field("cold", description="cold: booted from its kernel; clone: restored from the template")
    template: str | None = Field(None, description="a clone's template directory (under data_dir/templates)")
    labels: dict[str, str] = Field(default_factory=dict)
    expires_at: datetime | None = Field(None, description="the claim's lease: past it the VM is stopped (vm.expired)")

    @field_validator("labels", mode="before")
    @classmethod
    def _no_labels(cls, value):
        return value or {}


class ClaimOut(VMOut):
    claim: Literal["hit", "miss"]


class ClaimRequest(_In):
    flavor: str = Field(pattern=NAME_PATTERN, max_length=63)
    wait: bool = Field(True, description="on a miss, cold-boot and wait (true) or answer 503 (false)")
    ttl_s: int | None = Field(None, ge=1, le=MAX_TTL_S, strict=True,
                              description="a lease: the VM is stopped this long after the claim unless renewed "
                                          "(PATCH /v1/vms/{id} {\"ttl_s\": N})")
    labels: dict[str, str] = Field(default_factory=dict, description="Kubernetes-style labels")


class VMPatch(_In):
    """A JSON merge patch of a VM: renew (or set) its lease, change its labels (a null value removes a label)."""

    ttl_s: int | None = Field(None, ge=1, le=MAX_TTL_S, strict=True,
                              description="the lease ends this many seconds from now")
    labels: dict[str, str | None] | None = None


class ExecRequest(_In):
    """POST /v1/vms/{id}/exec: a subset of the VMM's POST /exec, checked by its one validator (vmm_api.check_exec,
    the VMM runs it too); the contract's limits are repeated here for the OpenAPI document only."""

    argv: list[str] = Field(json_schema_extra={"minItems": 1, "maxItems": vmm_api.MAX_ARGS})
    stdin_b64: str | None = Field(None, description=f"base64, at most {MAX_EXEC_STDIN} bytes decoded")
    env: dict[str, str] | None = None
    cwd: str = Field("/", json_schema_extra={"maxLength": vmm_api.MAX_PATH})
    timeout_s: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": vmm_api.MAX_TIMEOUT_S})

    @model_validator(mode="after")
    def _contract(self):
        vmm_api.check_exec(self.model_dump(exclude_none=True))  # ApiError is a ValueError: a 422 that quotes it
        return self


class ExecOut(BaseModel):
    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout_b64: str
    stderr_b64: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float


class GuestMount(_In):
    """A mount the agent makes in the guest (mount(2): MS_* flags, fs-specific data), e.g. a container's /proc."""

    source: str = Field("none", max_length=4096)
    target: str = Field(..., min_length=2, max_length=4096, pattern=r"^/[^\x00]*$", description="absolute, guest")
    fstype: str = Field("", max_length=64)
    flags: int = Field(0, ge=0, le=0xFFFFFFFF)
    data: str = Field("", max_length=4096)
    mkdir: bool = True


class RootfsRequest(_In):
    """POST /v1/vms/{id}/rootfs with a JSON body: a directory on the pclited host. (Or send a tar stream of the
    rootfs with Content-Type: application/x-tar and read_only/size_mib as query parameters.)"""

    path: str = Field(..., min_length=1, max_length=4096, description="absolute path of the rootfs directory")
    read_only: bool = False
    size_mib: int | None = Field(None, ge=1, le=1 << 20, description="ext4 image size; null = content + 64 MiB")
    mounts: list[GuestMount] = Field(default_factory=list, max_length=64,
                                     description="made in order once the rootfs is mounted (a container's /proc...)")
    hostname: str | None = Field(None, min_length=1, max_length=64, description="the guest's host name")


class RootfsOut(BaseModel):
    vm_id: str
    device: str
    mountpoint: str = Field(description="where the agent mounted it in the guest")
    read_only: bool
    image: str
    image_bytes: int
    content_bytes: int
    files: int
    size_mib: int
    source: str
    cached: bool = Field(description="the image was copied from pclited's cache of images of the same tree")
    build_ms: float
    attach_ms: float = Field(description="disk swap, the rootfs mount and the request's mounts and host name")
    mounts: int = Field(0, description="the request's mounts made after the rootfs's")
    hostname: str | None = None
    tar_bytes: int | None = None
    unpack_ms: float | None = None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    vm_id: str | None
    flavor: str | None
    kind: str
    message: str
    at: datetime


class VersionOut(BaseModel):
    version: str


class Problem(BaseModel):
    """RFC 7807 problem details (application/problem+json): every 4xx and 5xx answer."""

    type: str = Field(description="urn:pclite:problem:<slug>, e.g. urn:pclite:problem:not-found")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str = Field(description="what was wrong and what to do")
