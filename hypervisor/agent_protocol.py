"""The host side of the pclite agent wire protocol (guestbuild/agent/PROTOCOL.md): frame codec and message payloads,
pure Python, no I/O.

A frame is a 12-byte little-endian header `<IIHH` (payload_len, id, type, flags) then the payload. `FrameDecoder`
turns a byte stream fed in arbitrary pieces into `Frame`s; each message with a structured payload has a frozen
namedtuple with `encode() -> bytes` (the payload), `decode(payload)` and, for requests, `frame(id) -> Frame`.
Anything malformed raises `ProtocolError`.

It lives with its user, the VMM (the guest side, in C, is guestbuild/agent/). The VMM imports it at start-up, so
it stays cheap: namedtuples and int constants rather than dataclasses and enums (those imports plus class creation
cost ~0.25 s of VMM start in the lab).
"""

from __future__ import annotations

import struct
from collections import namedtuple

VERSION = "pclite-agent/2"  # 2: STDIN_ACK flow control for stdin (PROTOCOL.md)
HEADER = struct.Struct("<IIHH")
HEADER_SIZE = HEADER.size  # 12
MAX_PAYLOAD = 1 << 20
MAX_READ_LEN = MAX_PAYLOAD - 64
MAX_OUTPUT_CHUNK = 64 * 1024
MAX_EXECS = 64
DEFAULT_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=dumb")


class ProtocolError(ValueError):
    """Bytes that are not a valid frame or payload (or values that cannot be encoded); the message says which."""


class MsgType:
    """Frame types (plain ints); type_name() gives the name of one."""
    # host -> agent
    PING = 1
    EXEC = 2
    STDIN = 3
    SIGNAL = 4
    WRITE_FILE = 5
    READ_FILE = 6
    SET_CLOCK = 7
    RESEED = 8
    SET_HOSTNAME = 9
    SHUTDOWN = 10
    MOUNT = 11
    RESIZE = 12
    # agent -> host
    READY = 0x80
    OK = 0x81
    ERROR = 0x82
    STARTED = 0x83
    STDOUT = 0x84
    STDERR = 0x85
    EXIT = 0x86
    DATA = 0x87
    STDIN_ACK = 0x88


class ExecFlags:
    STDIN_FOLLOWS = 1
    TTY = 2      # stdin, stdout and stderr are a new terminal; its output arrives as STDOUT
    PROCESS = 4  # process fields follow the env strings (ExecRequest.root/user/rlimits/size)


KEEP_USER = 0xFFFFFFFF  # ExecRequest user None on the wire: the child keeps the agent's uid, gid and groups
RLIM_INFINITY = (1 << 64) - 1


class MountFlags:
    MKDIR = 1  # MOUNT option: create the target (and its parents) first


class WriteFlags:
    APPEND = 1
    MKDIRS = 2


class ShutdownHow:
    POWEROFF = 0
    REBOOT = 1


_TYPE_NAMES = {value: name for name, value in vars(MsgType).items() if not name.startswith("_")}


def type_name(type_: int) -> str:
    """The name of a frame type ("EXEC"), or "type 0x99" for one the protocol does not define."""
    return _TYPE_NAMES.get(type_) or f"type {type_:#x}"


class Frame(namedtuple("Frame", "type id payload flags", defaults=(b"", 0))):
    __slots__ = ()

    def encode(self) -> bytes:
        return encode_frame(self.type, self.id, self.payload, self.flags)

    def __repr__(self) -> str:
        shown = self.payload if len(self.payload) <= 32 else self.payload[:32] + b"..."
        return f"Frame({type_name(self.type)}, id={self.id}, {len(self.payload)} bytes {shown!r})"


def encode_frame(type_: int, id_: int, payload: bytes = b"", flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{type_name(type_)} payload of {len(payload)} bytes exceeds the maximum of "
                            f"{MAX_PAYLOAD} bytes")
    try:
        return HEADER.pack(len(payload), id_, type_, flags) + bytes(payload)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode frame header (id={id_}, type={type_}, flags={flags}): {exc}") from None


class FrameDecoder:
    """Incremental decoder: feed() any slice of the stream, get the frames it completed, in order.

    After a ProtocolError the stream is unusable (there is no way to find the next frame boundary) and every
    further feed() raises again.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        self._buffer += data
        frames = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= HEADER_SIZE:
            length, id_, type_, flags = HEADER.unpack_from(buffer, offset)
            if length > self.max_payload:
                header = bytes(buffer[offset:offset + HEADER_SIZE]).hex()
                self._error = ProtocolError(
                    f"frame header {header} (id={id_}, {type_name(type_)}) declares a {length}-byte payload, "
                    f"over the {self.max_payload}-byte maximum: the stream is out of sync or corrupt")
                del buffer[:offset]
                raise self._error
            end = offset + HEADER_SIZE + length
            if len(buffer) < end:
                break
            frames.append(Frame(type_, id_, bytes(buffer[offset + HEADER_SIZE:end]), flags))
            offset = end
        del buffer[:offset]
        return frames


# ---- payload helpers ----

def _cstr(value: str, what: str) -> bytes:
    data = value.encode()
    if b"\0" in data:
        raise ProtocolError(f"{what} {value!r} contains a NUL byte")
    return data + b"\0"


class _Reader:
    """Reads a payload: fixed fields, then NUL-terminated UTF-8 strings."""

    def __init__(self, payload: bytes, what: str) -> None:
        self.payload, self.what, self.offset = bytes(payload), what, 0

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if len(self.payload) - self.offset < size:
            raise ProtocolError(f"{self.what} payload of {len(self.payload)} bytes is too short for its "
                                f"{size}-byte {fmt} fields")
        values = struct.unpack_from(fmt, self.payload, self.offset)
        self.offset += size
        return values

    def string(self, name: str) -> str:
        end = self.payload.find(b"\0", self.offset)
        if end < 0:
            raise ProtocolError(f"{self.what} payload ends before the NUL that terminates its {name}")
        raw = self.payload[self.offset:end]
        self.offset = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{self.what} {name} is not valid UTF-8: {exc}") from None

    def rest(self) -> bytes:
        return self.payload[self.offset:]


def _pack(what: str, fmt: str, *values) -> bytes:
    try:
        return struct.pack(fmt, *values)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode {what} fields {values}: {exc}") from None


class ExecRequest(namedtuple("ExecRequest", "argv cwd env timeout_ms output_cap stdin tty root user rlimits size",
                             defaults=("/", (), 0, 0, False, False, "", None, (), None))):
    """EXEC: run argv (a tuple) in cwd ("" = the agent's own) with env (a tuple of "K=V"; empty = DEFAULT_ENV).

    stdin: STDIN_FOLLOWS, stdin is a pipe fed by STDIN frames (otherwise /dev/null).
    tty: the child gets a new terminal for stdin/stdout/stderr (STDIN frames feed it, its output is STDOUT).
    The process fields (sent with flag PROCESS when any is set): root, a directory to chroot into before cwd;
    user, (uid, gid, (groups...)) or None to keep the agent's; rlimits, ((resource, soft, hard), ...);
    size, the terminal's initial (rows, cols) or None.
    """
    __slots__ = ()

    TYPE = MsgType.EXEC

    @property
    def has_process_fields(self) -> bool:
        return bool(self.root or self.user is not None or self.rlimits or self.size)

    def encode(self) -> bytes:
        if not self.argv:
            raise ProtocolError("EXEC needs at least argv[0]")
        for item in self.env:
            if "=" not in item:
                raise ProtocolError(f"EXEC env entry {item!r} is not K=V")
        flags = (ExecFlags.STDIN_FOLLOWS if self.stdin else 0) | (ExecFlags.TTY if self.tty else 0)
        flags |= ExecFlags.PROCESS if self.has_process_fields else 0
        head = _pack("EXEC", "<IIIHH", self.timeout_ms, self.output_cap, flags, len(self.argv), len(self.env))
        strings = [_cstr(self.cwd, "EXEC cwd")]
        strings += [_cstr(arg, "EXEC argv entry") for arg in self.argv]
        strings += [_cstr(item, "EXEC env entry") for item in self.env]
        if flags & ExecFlags.PROCESS:
            strings.append(self._process_fields())
        return head + b"".join(strings)

    def _process_fields(self) -> bytes:
        uid, gid, groups = self.user if self.user is not None else (KEEP_USER, KEEP_USER, ())
        rows, cols = self.size or (0, 0)
        out = [_cstr(self.root, "EXEC root"),
               _pack("EXEC", "<IIHHHH", uid, gid, len(groups), len(self.rlimits), rows, cols)]
        out += [_pack("EXEC group", "<I", group) for group in groups]
        out += [_pack("EXEC rlimit", "<IQQ", *limit) for limit in self.rlimits]
        return b"".join(out)

    @classmethod
    def decode(cls, payload: bytes) -> ExecRequest:
        reader = _Reader(payload, "EXEC")
        timeout_ms, output_cap, flags, argc, envc = reader.unpack("<IIIHH")
        cwd = reader.string("cwd")
        argv = tuple(reader.string(f"argv[{i}]") for i in range(argc))
        env = tuple(reader.string(f"env[{i}]") for i in range(envc))
        fields = {}
        if flags & ExecFlags.PROCESS:
            root = reader.string("root")
            uid, gid, ngroups, nrlimits, rows, cols = reader.unpack("<IIHHHH")
            groups = tuple(reader.unpack("<I")[0] for _ in range(ngroups))
            rlimits = tuple(reader.unpack("<IQQ") for _ in range(nrlimits))
            fields = {"root": root, "user": None if uid == KEEP_USER else (uid, gid, groups), "rlimits": rlimits,
                      "size": (rows, cols) if rows or cols else None}
        return cls(argv, cwd, env, timeout_ms, output_cap, bool(flags & ExecFlags.STDIN_FOLLOWS),
                   bool(flags & ExecFlags.TTY), **fields)

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class SignalRequest(namedtuple("SignalRequest", "signo")):
    __slots__ = ()

    TYPE = MsgType.SIGNAL

    def encode(self) -> bytes:
        return _pack("SIGNAL", "<I", self.signo)

    @classmethod
    def decode(cls, payload: bytes) -> SignalRequest:
        return cls(*_Reader(payload, "SIGNAL").unpack("<I"))

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class ResizeRequest(namedtuple("ResizeRequest", "rows cols")):
    """RESIZE (id = the exec id): the terminal size of an exec started with tty."""
    __slots__ = ()

    TYPE = MsgType.RESIZE

    def encode(self) -> bytes:
        return _pack("RESIZE", "<HH", self.rows, self.cols)

    @classmethod
    def decode(cls, payload: bytes) -> ResizeRequest:
        return cls(*_Reader(payload, "RESIZE").unpack("<HH"))

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class MountRequest(namedtuple("MountRequest", "source target fstype flags data mkdir",
                              defaults=("", 0, "", True))):
    """MOUNT: mount(2) source on target; flags are MS_* bits, data the fs options ("" = none)."""
    __slots__ = ()

    TYPE = MsgType.MOUNT

    def encode(self) -> bytes:
        if not self.target:
            raise ProtocolError("MOUNT needs a target")
        return (_pack("MOUNT", "<II", self.flags, MountFlags.MKDIR if self.mkdir else 0)
                + b"".join(_cstr(value, f"MOUNT {name}") for name, value in
                           (("source", self.source), ("target", self.target), ("fstype", self.fstype),
                            ("data", self.data))))

    @classmethod
    def decode(cls, payload: bytes) -> MountRequest:
        reader = _Reader(payload, "MOUNT")
        flags, options = reader.unpack("<II")
        source, target, fstype, data = (reader.string(name) for name in ("source", "target", "fstype", "data"))
        return cls(source, target, fstype, flags, data, bool(options & MountFlags.MKDIR))

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class WriteFileRequest(namedtuple("WriteFileRequest", "path data mode append mkdirs", defaults=(0o644, False, False))):
    __slots__ = ()

    TYPE = MsgType.WRITE_FILE

    def encode(self) -> bytes:
        flags = (WriteFlags.APPEND if self.append else 0) | (WriteFlags.MKDIRS if self.mkdirs else 0)
        return _pack("WRITE_FILE", "<II", self.mode, flags) + _cstr(self.path, "WRITE_FILE path") + bytes(self.data)

    @classmethod
    def decode(cls, payload: bytes) -> WriteFileRequest:
        reader = _Reader(payload, "WRITE_FILE")
        mode, flags = reader.unpack("<II")
        path = reader.string("path")
        return cls(path, reader.rest(), mode, bool(flags & WriteFlags.APPEND), bool(flags & WriteFlags.MKDIRS))

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class ReadFileRequest(namedtuple("ReadFileRequest", "path offset max_len", defaults=(0, MAX_READ_LEN))):
    __slots__ = ()

    TYPE = MsgType.READ_FILE

    def encode(self) -> bytes:
        if not 0 <= self.max_len <= MAX_READ_LEN:
            raise ProtocolError(f"READ_FILE max_len {self.max_len} is outside 0..{MAX_READ_LEN}")
        return _pack("READ_FILE", "<QI", self.offset, self.max_len) + _cstr(self.path, "READ_FILE path")

    @classmethod
    def decode(cls, payload: bytes) -> ReadFileRequest:
        reader = _Reader(payload, "READ_FILE")
        offset, max_len = reader.unpack("<QI")
        return cls(reader.string("path"), offset, max_len)

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class SetClockRequest(namedtuple("SetClockRequest", "seconds nanoseconds", defaults=(0,))):
    __slots__ = ()

    TYPE = MsgType.SET_CLOCK

    @classmethod
    def from_ns(cls, unix_ns: int) -> SetClockRequest:
        return cls(*divmod(unix_ns, 1_000_000_000))

    def encode(self) -> bytes:
        if not 0 <= self.nanoseconds < 1_000_000_000:
            raise ProtocolError(f"SET_CLOCK nanoseconds {self.nanoseconds} is outside 0..999999999")
        return _pack("SET_CLOCK", "<QI", self.seconds, self.nanoseconds)

    @classmethod
    def decode(cls, payload: bytes) -> SetClockRequest:
        return cls(*_Reader(payload, "SET_CLOCK").unpack("<QI"))

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class ShutdownRequest(namedtuple("ShutdownRequest", "how", defaults=(ShutdownHow.POWEROFF,))):
    __slots__ = ()

    TYPE = MsgType.SHUTDOWN

    def encode(self) -> bytes:
        return _pack("SHUTDOWN", "<I", self.how)

    @classmethod
    def decode(cls, payload: bytes) -> ShutdownRequest:
        (how,) = _Reader(payload, "SHUTDOWN").unpack("<I")
        if how not in (ShutdownHow.POWEROFF, ShutdownHow.REBOOT):
            raise ProtocolError(f"SHUTDOWN how {how} is neither 0 (poweroff) nor 1 (reboot)")
        return cls(how)

    def frame(self, id_: int) -> Frame:
        return Frame(self.TYPE, id_, self.encode())


class Ready(namedtuple("Ready", "version kernel_release")):
    """READY (id 0): `pclite-agent/<version> <kernel release>`."""
    __slots__ = ()

    TYPE = MsgType.READY

    def encode(self) -> bytes:
        return f"{self.version} {self.kernel_release}".encode()

    @classmethod
    def decode(cls, payload: bytes) -> Ready:
        try:
            text = bytes(payload).decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"READY payload is not UTF-8: {exc}") from None
        version, sep, release = text.partition(" ")
        if not sep or not version.startswith("pclite-agent/"):
            raise ProtocolError(f"READY payload {text!r} is not 'pclite-agent/<n> <kernel release>'")
        return cls(version, release)


class ErrorReply(namedtuple("ErrorReply", "errno message")):
    __slots__ = ()

    TYPE = MsgType.ERROR

    def encode(self) -> bytes:
        return _pack("ERROR", "<i", self.errno) + _cstr(self.message, "ERROR message")

    @classmethod
    def decode(cls, payload: bytes) -> ErrorReply:
        reader = _Reader(payload, "ERROR")
        (errno,) = reader.unpack("<i")
        return cls(errno, reader.string("message"))


class Started(namedtuple("Started", "pid")):
    __slots__ = ()

    TYPE = MsgType.STARTED

    def encode(self) -> bytes:
        return _pack("STARTED", "<I", self.pid)

    @classmethod
    def decode(cls, payload: bytes) -> Started:
        return cls(*_Reader(payload, "STARTED").unpack("<I"))


class StdinAck(namedtuple("StdinAck", "consumed")):
    """STDIN_ACK (exec id): this many more bytes of the exec's stdin left the agent's buffer (version 2)."""
    __slots__ = ()

    TYPE = MsgType.STDIN_ACK

    def encode(self) -> bytes:
        return _pack("STDIN_ACK", "<I", self.consumed)

    @classmethod
    def decode(cls, payload: bytes) -> StdinAck:
        return cls(*_Reader(payload, "STDIN_ACK").unpack("<I"))


class ExitKind:
    EXITED = 0
    SIGNALED = 1


class ExitStatus(namedtuple("ExitStatus", "kind code timed_out stdout_truncated stderr_truncated duration_us",
                            defaults=(False, False, False, 0))):
    """EXIT: code is the exit status (kind EXITED) or the signal number (kind SIGNALED)."""
    __slots__ = ()

    TYPE = MsgType.EXIT

    @property
    def signaled(self) -> bool:
        return self.kind == ExitKind.SIGNALED

    def encode(self) -> bytes:
        return _pack("EXIT", "<BBBBiQ", self.kind, self.timed_out, self.stdout_truncated, self.stderr_truncated,
                     self.code, self.duration_us)

    @classmethod
    def decode(cls, payload: bytes) -> ExitStatus:
        kind, timed_out, out_trunc, err_trunc, code, duration = _Reader(payload, "EXIT").unpack("<BBBBiQ")
        if kind not in (ExitKind.EXITED, ExitKind.SIGNALED):
            raise ProtocolError(f"EXIT kind {kind} is neither 0 (exited) nor 1 (signaled)")
        return cls(kind, code, bool(timed_out), bool(out_trunc), bool(err_trunc), duration)


# Frames whose payload is plain bytes (PING, STDIN, RESEED, SET_HOSTNAME, OK, STDOUT, STDERR, DATA) need no class.

def ping(id_: int, payload: bytes = b"") -> Frame:
    return Frame(MsgType.PING, id_, bytes(payload))


def stdin(exec_id: int, data: bytes) -> Frame:
    """STDIN data for an exec; empty data closes the child's stdin."""
    return Frame(MsgType.STDIN, exec_id, bytes(data))


def reseed(id_: int, entropy: bytes) -> Frame:
    return Frame(MsgType.RESEED, id_, bytes(entropy))


def set_hostname(id_: int, name: str) -> Frame:
    data = name.encode()
    if b"\0" in data:
        raise ProtocolError(f"SET_HOSTNAME name {name!r} contains a NUL byte")
    return Frame(MsgType.SET_HOSTNAME, id_, data)


_DECODERS = {cls.TYPE: cls for cls in (ExecRequest, SignalRequest, ResizeRequest, MountRequest, WriteFileRequest,
                                       ReadFileRequest,
                                       SetClockRequest, ShutdownRequest, Ready, ErrorReply, Started, ExitStatus,
                                       StdinAck)}


def decode_payload(frame: Frame):
    """The typed message of a frame: a namedtuple for structured payloads, the raw bytes for the others."""
    cls = _DECODERS.get(frame.type)
    return frame.payload if cls is None else cls.decode(frame.payload)
