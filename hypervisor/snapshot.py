"""Snapshots: a paused VM's full state in a directory, so `restore` (hypervisor/restore.py) can clone it.

  DIR/memory      guest RAM, the regions back to back; a plain sparse file that clones map MAP_PRIVATE
  DIR/state.json  {"format", "version", "sha256", "state"}: sha256 is over the bytes of "state" as written

"state" holds the host identity (a snapshot only restores where the same CPUID and XSAVE layout exist), the
VM's size (config: mem_mib and vcpus, nothing else), every vCPU (ctypes ABI structs as hex, CPUID, MSRs), the
VM-wide KVM state (PIC, IOAPIC, PIT, kvmclock), every device that has save_state(), the agent's version and the
memory layout with the memory file's plain name and its digest (memory_digest), so the one checksum in the header
covers the state and, through it, the memory. The memory file is never rewritten in place (written aside, then
renamed): clones map it, and a MAP_PRIVATE mapping still sees changes the file takes in pages the clone has not
copied yet.

Checksums, not an HMAC with a host key: the snapshot is written by the template's VMM, and a key it could read
would be readable by any guest that breaks into a VMM (which could then forge snapshots for every VM). The
checksums catch a damaged or mismatched memory file; what a snapshot can do is bounded instead: it names no host
file (a plain memory file name, no disk paths: a clone's disks come from its RunSpec), and its directory is
pclited's own.
"""

from __future__ import annotations

import ctypes
import json
import os
import time

from hypervisor import kvm_structs as K

try:
    from _sha256 import sha256 as _sha256  # the builtin: hashlib (OpenSSL) is a slow import on the restore path
except ImportError:  # Python 3.12+ names it _sha2
    from hashlib import sha256 as _sha256

FORMAT = "pclite-snapshot"
VERSION = 2  # 2: the memory's digest in the state, config holds mem_mib and vcpus only
STATE_FILE = "state.json"
MEMORY_FILE = "memory"
PAGE = 4096
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
HYPERV_MSRS = range(0x40000000, 0x40000100)  # no Hyper-V CPUID is offered: nothing of the guest's lives there
MTRR_MSRS = (0x2FF, *range(0x200, 0x210), 0x250, 0x258, 0x259, *range(0x268, 0x270))  # not in KVM's index list
IRQCHIPS = (("pic_master", K.KVM_IRQCHIP_PIC_MASTER), ("pic_slave", K.KVM_IRQCHIP_PIC_SLAVE),
            ("ioapic", K.KVM_IRQCHIP_IOAPIC))


class SnapshotError(Exception):
    """A snapshot cannot be taken or used; the message says what to do instead."""


def sha256_hex(data: bytes) -> str:
    return _sha256(data).hexdigest()


def state_document(state: dict, version: int = VERSION) -> bytes:
    """state.json's bytes: the header, then "state" last, so its checksum covers bytes found without re-encoding."""
    body = json.dumps(state, separators=(",", ":")).encode()
    head = json.dumps({"format": FORMAT, "version": version, "sha256": sha256_hex(body)}, separators=(",", ":"))
    return head.encode()[:-1] + STATE_KEY + body + b"}"


STATE_KEY = b',"state":'


# ---- host identity

_HOST_IDENTITY: dict[int, dict] = {}  # vcpus -> host_identity(), kept by a fork server for its clones


def host_identity(kvm, vcpus: int, cached: bool = False) -> dict:
    """What must match between the host that took a snapshot and the one restoring it (`cached`: as computed
    earlier in this process or the fork server it came from: the host's KVM does not change under it).

    The CPUID is hashed after normalisation (for `vcpus` vCPUs): KVM reports leaf 1 with the APIC id of the host
    CPU the ioctl happened to run on, which must not make two runs on one host look different.
    """
    from hypervisor.cpuid import normalize_cpuid
    if cached and vcpus in _HOST_IDENTITY:
        return _HOST_IDENTITY[vcpus]
    tsc_deadline = bool(kvm.check_extension(K.KVM_CAP_TSC_DEADLINE_TIMER))
    rows = [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for index in range(vcpus)
            for e in normalize_cpuid(kvm.supported_cpuid(), index, vcpus, tsc_deadline=tsc_deadline)]
    identity = {"cpuid_sha256": sha256_hex(repr(rows).encode()),
                "xsave_size": max(kvm.check_extension(K.KVM_CAP_XSAVE2), 0) or K.XSAVE_LEGACY_SIZE,
                "kvm_api": kvm.api_version()}
    _HOST_IDENTITY[vcpus] = identity
    return identity


def check_host(saved: dict, current: dict, where: str) -> None:
    for key, what in (("kvm_api", "KVM API version"), ("xsave_size", "XSAVE area size"),
                      ("cpuid_sha256", "CPU features (CPUID)")):
        if saved.get(key) != current.get(key):
            raise SnapshotError(f"snapshot {where} was taken on a host with a different {what} "
                                f"({saved.get(key)} here {current.get(key)}): restore it on the host that took it, "
                                f"or take a new snapshot on this one")


# ---- MSRs (partial reads/writes: KVM stops at the first MSR it refuses and returns how many it did)

def msrs_to_save(kvm) -> list[int]:
    listed = [index for index in kvm.msr_index_list() if index not in HYPERV_MSRS]
    indices = list(dict.fromkeys(listed + list(MTRR_MSRS)))
    # Restore order: the TSC first (kvmclock and the TSC_ADJUST logic are relative to it), the TSC deadline last
    # (KVM ignores it unless the LAPIC, restored before the MSRs, is already in TSC-deadline mode).
    indices.sort(key=lambda i: (i != MSR_IA32_TSC, i == MSR_IA32_TSC_DEADLINE))
    return indices


def msr_transfer(vcpu, request: int, pairs: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """KVM_GET_MSRS/KVM_SET_MSRS over `pairs`, skipping MSRs KVM refuses: (pairs done, indices refused)."""
    done, refused = [], []
    while pairs:
        buf = K.make_kvm_msrs(len(pairs))
        for entry, (index, value) in zip(buf.entries, pairs, strict=True):
            entry.index, entry.data = index, value
        count = vcpu.ioctl(request, buf)
        done += [(buf.entries[i].index, buf.entries[i].data) for i in range(count)]
        if count < len(pairs):
            refused.append(pairs[count][0])
        pairs = pairs[count + 1:]
    return done, refused


# ---- capture

def _hex(struct) -> str:
    return bytes(struct).hex()


def save_vcpu(vcpu, msr_indices: list[int], has_xcrs: bool) -> dict:
    # MP state first: reading it makes KVM process pending INIT/SIPI; vCPU events last (the order Firecracker
    # and QEMU use).
    state = {"mp_state": vcpu.get_mp_state(), "regs": _hex(vcpu.get_regs()), "sregs": _hex(vcpu.get_sregs()),
             "xsave": vcpu.get_xsave().hex()}
    if has_xcrs:
        state["xcrs"] = _hex(vcpu.get_xcrs())
    state["debugregs"] = _hex(vcpu.get_debugregs())
    state["lapic"] = _hex(vcpu.get_lapic())
    state["cpuid"] = [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in vcpu.get_cpuid2()]
    state["msrs"], _ = msr_transfer(vcpu, K.KVM_GET_MSRS, [(index, 0) for index in msr_indices])
    state["events"] = _hex(vcpu.get_vcpu_events())
    return state


def save_vm(vm) -> dict:
    clock = vm.get_clock()
    state = {name: _hex(vm.get_irqchip(chip)) for name, chip in IRQCHIPS}
    state["pit2"] = _hex(vm.get_pit2())
    state["clock_ns"] = clock.clock
    return state


def device_key(bus, base: int, device) -> str:
    return f"{bus.name}@{base:#x}:{getattr(device, 'name', None) or type(device).__name__}"


def stateful_devices(machine) -> dict:
    """{stable key: device} for every device on the machine's buses that has save_state()."""
    return {device_key(bus, base, device): device
            for bus in (machine.pio_bus, machine.mmio_bus)
            for base, _, device in bus.devices() if hasattr(device, "save_state")}


CONFIG_KEYS = ("mem_mib", "vcpus")  # all a clone takes from its template: everything else is the restorer's


def check_snapshottable(machine, agent) -> None:
    if agent is not None and agent.busy:
        raise SnapshotError("an agent request (exec, file transfer...) is in flight: snapshot when the guest agent "
                            "is idle, or the clones would resume in the middle of it")
    disk = getattr(machine, "rootfs", None)
    path = getattr(disk, "path", None)
    if disk is not None and not getattr(disk, "read_only", True) and path not in (None, os.devnull):
        raise SnapshotError(f"the VM has a writable disk attached ({path}): every clone would write to the same "
                            f"file; attach it read-only (or after cloning) and snapshot again")


def capture(machine, agent) -> dict:
    """The state of a paused machine (everything but RAM)."""
    kvm = machine.kvm
    msr_indices = msrs_to_save(kvm)
    has_xcrs = bool(kvm.check_extension(K.KVM_CAP_XCRS))
    vcpus = [save_vcpu(thread.vcpu, msr_indices, has_xcrs) for thread in machine.threads]
    config = {key: getattr(machine.config, key) for key in CONFIG_KEYS}
    return {"host": host_identity(kvm, machine.config.vcpus), "config": config,
            "vcpus": vcpus, "vm": save_vm(machine.vm),
            "devices": {key: device.save_state() for key, device in stateful_devices(machine).items()},
            "agent": {"version": agent.version if agent is not None else None},
            "created_unix": time.time(), "template_pid": os.getpid()}


# ---- guest RAM

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
ZERO_CHUNK = 64 << 10
_ZEROS = ctypes.create_string_buffer(ZERO_CHUNK)
_HAS_PAGE = bytes(int(bool(i & 0xC0)) for i in range(256))  # pagemap's top byte: bit 7 present, bit 6 swapped


def _runs(flags: bytes, unit: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the runs of 1s in flags, one flag per `unit` bytes."""
    runs, start = [], flags.find(1)
    while start >= 0:
        end = flags.find(0, start)
        end = len(flags) if end < 0 else end
        runs.append((start * unit, min(end * unit, size) - start * unit))
        start = flags.find(1, end)
    return runs


def populated_runs(address: int, size: int) -> list[tuple[int, int]]:
    """Runs of anonymous memory that hold pages, in RAM or swapped out (/proc/self/pagemap); the rest was never
    touched and reads as zero. One run if pagemap is unreadable."""
    pages = (size + PAGE - 1) // PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(address // PAGE * 8)
            raw = pagemap.read(pages * 8)
    except OSError:
        return [(0, size)]
    if len(raw) != pages * 8:
        return [(0, size)]
    return _runs(raw[7::8].translate(_HAS_PAGE), PAGE, size)


def data_runs(address: int, size: int, anonymous: bool) -> list[tuple[int, int]]:
    """The runs of [address, address+size) worth writing: populated (anonymous memory; file-backed memory, a clone's,
    may hold data anywhere), minus all-zero ZERO_CHUNKs, which stay holes in the file."""
    runs = []
    for start, length in populated_runs(address, size) if anonymous else [(0, size)]:
        chunk = start
        while chunk < start + length:
            n = min(ZERO_CHUNK - chunk % ZERO_CHUNK, start + length - chunk)
            if _libc.memcmp(address + chunk, _ZEROS, n) != 0:
                if runs and runs[-1][0] + runs[-1][1] == chunk:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((chunk, n))
            chunk += n
    return runs


def write_memory(memory, path: str) -> tuple[list[list[int]], int]:
    """Guest RAM to `path` (regions back to back, zero ranges as holes); ([[gpa, size, offset]], bytes written)."""
    from hypervisor.kvm import buffer_address
    layout, offset, written = [], 0, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for gpa, size, mapping in memory.regions:
            view = memoryview(mapping)
            try:
                anonymous = not getattr(memory, "file_backed", False)
                for start, length in data_runs(buffer_address(mapping), size, anonymous):
                    done = 0
                    while done < length:
                        done += os.pwrite(fd, view[start + done:start + length], offset + start + done)
                    written += length
            finally:
                view.release()
            layout.append([gpa, size, offset])
            offset += size
        os.ftruncate(fd, offset)
    finally:
        os.close(fd)
    return layout, written


_ZERO_BLOCK = bytes(ZERO_CHUNK)
DIGEST_READ = 16 * ZERO_CHUNK


def memory_digest(path: str) -> str:
    """sha256 over the memory file's non-zero ZERO_CHUNKs, each preceded by its offset (8 bytes, little-endian):
    defined by the content alone (a hole and written zeros hash alike), and only the data extents are read.
    OpenSSL's sha256 (hashlib): ~7x the builtin's speed on tens of MiB, which outweighs its import."""
    import hashlib
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == 6:  # ENXIO: nothing but holes from here on
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            offset = data - data % ZERO_CHUNK
            while offset < hole:
                block = os.pread(fd, DIGEST_READ, offset)
                if not block:
                    break
                view = memoryview(block)
                for start in range(0, len(block), ZERO_CHUNK):
                    chunk = view[start:start + ZERO_CHUNK]
                    if chunk != _ZERO_BLOCK[:len(chunk)]:
                        digest.update((offset + start).to_bytes(8, "little"))
                        digest.update(chunk)
                offset += len(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


# ---- the whole thing

def take_snapshot(machine, agent, out_dir: str, resume: bool = True) -> dict:
    """Pause the machine, write `out_dir`, resume it if `resume`. Returns a summary for the API."""
    check_snapshottable(machine, agent)
    was_paused = machine.pause_requested
    started = time.monotonic()
    if not was_paused and not machine.pause():
        machine.resume()
        raise SnapshotError("the vCPUs did not pause within 5 s; try again")
    try:
        check_snapshottable(machine, agent)  # again: a request may have started before the pause
        os.makedirs(out_dir, exist_ok=True)
        state = capture(machine, agent)
        memory_path = os.path.join(out_dir, MEMORY_FILE)
        # Written aside and renamed: clones of an older snapshot in this directory keep their own (unlinked) file.
        layout, written = write_memory(machine.memory, memory_path + ".new")
        state["memory"] = {"file": MEMORY_FILE, "bytes": machine.memory.size, "regions": layout,
                           "sha256": memory_digest(memory_path + ".new")}
        state_path = os.path.join(out_dir, STATE_FILE)
        with open(state_path + ".new", "wb") as out:
            out.write(state_document(state))
        os.replace(memory_path + ".new", memory_path)
        os.replace(state_path + ".new", state_path)  # last: a directory without state.json is no snapshot
    finally:
        paused_ms = round((time.monotonic() - started) * 1000, 3)
        if resume and not machine.stopping:
            machine.resume()
    return {"dir": os.path.abspath(out_dir), "memory_bytes": machine.memory.size, "memory_written": written,
            "paused_ms": paused_ms, "resumed": bool(resume)}


# snapshot dir -> (file identities, state): snapshots a fork server has verified once, so that the clones it
# forks skip reading, checksumming and parsing state.json (~50 ms of a clone in the lab).
_PRELOADED: dict[str, tuple[tuple, dict]] = {}


def _identity(snapshot_dir: str, state: dict | None = None) -> tuple:
    """What changes when state.json or the memory file is rewritten, replaced or truncated."""
    paths = [os.path.join(snapshot_dir, STATE_FILE)]
    if state is not None:
        paths.append(os.path.join(snapshot_dir, state["memory"]["file"]))
    found = []
    for path in paths:
        stat = os.stat(path)  # ctime too: a writer can set mtime back, not ctime
        found.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(found)


def preload_snapshot(snapshot_dir: str) -> bool:
    """Verify `snapshot_dir` once and keep its state in memory, with this host's identity for its vCPU count (a
    fork server's children inherit both). True when something new was kept."""
    cached = _PRELOADED.get(snapshot_dir)
    kept = False
    try:
        if not (cached and _identity(snapshot_dir, cached[1]) == cached[0]):
            state = load_snapshot(snapshot_dir, use_preloaded=False)
            cached = _PRELOADED[snapshot_dir] = (_identity(snapshot_dir, state), state)
            kept = True
        vcpus = cached[1]["config"]["vcpus"]
    except (SnapshotError, OSError, KeyError, TypeError, ValueError):
        _PRELOADED.pop(snapshot_dir, None)  # the clone reports it, in its own words
        return False
    if vcpus not in _HOST_IDENTITY:
        from hypervisor.kvm import Kvm
        try:
            kvm = Kvm()
        except OSError:
            return kept  # no usable /dev/kvm: the clone says so
        try:
            host_identity(kvm, vcpus)
            kept = True
        finally:
            kvm.close()
    return kept


def load_snapshot(snapshot_dir: str, use_preloaded: bool = True) -> dict:
    """The verified state of `snapshot_dir` (format, version, checksum, memory file); SnapshotError otherwise."""
    cached = _PRELOADED.get(snapshot_dir) if use_preloaded else None
    if cached is not None:
        try:
            if _identity(snapshot_dir, cached[1]) == cached[0]:
                return cached[1]
        except OSError:
            pass  # gone or changed: verified again below, which says what is wrong
    state_path = os.path.join(snapshot_dir, STATE_FILE)
    try:
        with open(state_path, "rb") as f:
            raw = f.read().rstrip()
        document = json.loads(raw)
    except FileNotFoundError:
        raise SnapshotError(f"{snapshot_dir} is not a snapshot (no {STATE_FILE}): take one with `python -m "
                            f"hypervisor snapshot --api-sock PATH --out {snapshot_dir}`") from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{state_path} cannot be read ({exc}): the snapshot is corrupted; take a new one") \
            from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError(f"{state_path} is not a pclite snapshot: take one with `python -m hypervisor snapshot`")
    if document.get("version") != VERSION:
        raise SnapshotError(f"snapshot {snapshot_dir} has format version {document.get('version')}, this pclite "
                            f"reads version {VERSION}: take a new snapshot with this pclite")
    state, start = document.get("state"), raw.find(STATE_KEY)
    if not isinstance(state, dict) or start < 0 or sha256_hex(raw[start + len(STATE_KEY):-1]) != document.get("sha256"):
        raise SnapshotError(f"snapshot {snapshot_dir} is corrupted (its state does not match its sha256 "
                            f"checksum): take a new snapshot")
    memory = _checked_layout(snapshot_dir, state)
    memory_path = os.path.join(snapshot_dir, memory["file"])
    expected = sum(size for _, size, _ in memory["regions"])
    try:
        actual = os.stat(memory_path).st_size
    except OSError as exc:
        raise SnapshotError(f"snapshot memory {memory_path} is missing ({exc.strerror}): take a new snapshot") \
            from None
    if actual != expected:
        raise SnapshotError(f"snapshot memory {memory_path} is {actual} bytes, the snapshot needs {expected}: the "
                            f"file was truncated or replaced; take a new snapshot")
    if memory_digest(memory_path) != memory.get("sha256"):
        raise SnapshotError(f"snapshot memory {memory_path} does not match its sha256 checksum: the file was changed "
                            f"or replaced; take a new snapshot")
    return state


def _checked_layout(snapshot_dir: str, state: dict) -> dict:
    """state's config and memory, checked to name no host file and no setting beyond the VM's size (a forged or
    foreign snapshot is refused here, before anything is opened from it)."""
    def refuse(what: str):
        raise SnapshotError(f"snapshot {snapshot_dir} {what}: it is forged or from another pclite; take a new "
                            f"snapshot")
    config, memory = state.get("config"), state.get("memory")
    if not isinstance(config, dict) or set(config) != set(CONFIG_KEYS):
        extra = sorted(set(config) - set(CONFIG_KEYS)) if isinstance(config, dict) else config
        refuse(f"has config keys {extra} besides {list(CONFIG_KEYS)}" if extra else "has no VM size in its config")
    if not all(type(config[key]) is int and config[key] > 0 for key in CONFIG_KEYS):
        refuse(f"has a bad VM size {config}")
    if not isinstance(memory, dict) or not isinstance(memory.get("regions"), list):
        refuse("has no memory layout")
    name = memory.get("file")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        refuse(f"names its memory file {name!r}, not a plain file name in the snapshot directory")
    offset = 0
    for region in memory["regions"]:
        if not (isinstance(region, list) and len(region) == 3 and all(type(v) is int and v >= 0 for v in region)
                and region[2] == offset):
            refuse(f"has a bad memory region {region!r}")
        offset += region[1]
    return memory
