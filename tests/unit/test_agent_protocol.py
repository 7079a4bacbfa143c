"""The agent wire-protocol codec: exact byte layouts, round trips, split feeds, and malformed input."""

import struct

import pytest

from hypervisor import agent_protocol as p

SAMPLE_FRAMES = [
    p.ping(1),
    p.ping(2, b"\x00\xffpayload"),
    p.ExecRequest(("sh", "-c", "echo hé"), cwd="/tmp", env=("A=1", "B=2=3"), timeout_ms=1500, output_cap=4096,
                  stdin=True).frame(3),
    p.stdin(3, b"data\n"),
    p.stdin(3, b""),
    p.Frame(p.MsgType.STDOUT, 3, bytes(range(256)) * 10),
    p.Frame(p.MsgType.EXIT, 3, p.ExitStatus(p.ExitKind.SIGNALED, 9, timed_out=True, duration_us=123456789).encode()),
    p.Frame(0x7FFF, 0xFFFFFFFF, b"", flags=0xFFFF),
]


def test_frame_header_layout():
    assert p.encode_frame(p.MsgType.PING, 7, b"ab") == bytes.fromhex("02000000" "07000000" "0100" "0000") + b"ab"
    assert p.Frame(p.MsgType.OK, 0x01020304, b"", 5).encode() == bytes.fromhex("00000000" "04030201" "8100" "0500")
    assert p.HEADER_SIZE == 12


def test_decoder_round_trip_in_one_feed():
    stream = b"".join(f.encode() for f in SAMPLE_FRAMES)
    decoder = p.FrameDecoder()
    assert decoder.feed(stream) == SAMPLE_FRAMES
    assert decoder.pending == 0


def test_decoder_split_at_every_byte_boundary():
    stream = b"".join(f.encode() for f in SAMPLE_FRAMES[:5])
    for cut in range(len(stream) + 1):
        decoder = p.FrameDecoder()
        frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert frames == SAMPLE_FRAMES[:5], cut
        assert decoder.pending == 0


def test_decoder_byte_by_byte_and_pending():
    stream = b"".join(f.encode() for f in SAMPLE_FRAMES)
    decoder = p.FrameDecoder()
    frames = []
    for index in range(len(stream)):
        frames += decoder.feed(stream[index:index + 1])
    assert frames == SAMPLE_FRAMES
    assert decoder.feed(stream[:5]) == [] and decoder.pending == 5


def test_max_payload_is_accepted_one_more_is_a_protocol_error():
    biggest = p.ping(1, bytes(p.MAX_PAYLOAD))
    assert p.FrameDecoder().feed(biggest.encode()) == [biggest]
    with pytest.raises(p.ProtocolError, match="exceeds the maximum"):
        p.encode_frame(p.MsgType.PING, 1, bytes(p.MAX_PAYLOAD + 1))
    decoder = p.FrameDecoder()
    assert decoder.feed(p.ping(1, b"ok").encode()) == [p.ping(1, b"ok")]
    with pytest.raises(p.ProtocolError, match=f"{p.MAX_PAYLOAD + 1}-byte payload"):
        decoder.feed(struct.pack("<IIHH", p.MAX_PAYLOAD + 1, 2, 1, 0))  # rejected before the payload arrives
    with pytest.raises(p.ProtocolError):  # the stream cannot be resynchronised
        decoder.feed(p.ping(3).encode())


def test_garbage_stream_is_a_protocol_error():
    with pytest.raises(p.ProtocolError, match="out of sync or corrupt"):
        p.FrameDecoder().feed(b"GET / HTTP/1.1\r\nHost: pclite\r\n\r\n")


def test_header_fields_out_of_range_cannot_be_encoded():
    with pytest.raises(p.ProtocolError, match="cannot encode frame header"):
        p.encode_frame(p.MsgType.PING, 1 << 32)
    with pytest.raises(p.ProtocolError):
        p.encode_frame(1 << 16, 1)


@pytest.mark.parametrize("message", [
    p.ExecRequest(("true",)),
    p.ExecRequest(("sh", "-c", "echo ünïcode"), cwd="", env=("K=V",), timeout_ms=2**32 - 1, output_cap=1, stdin=True),
    p.SignalRequest(15),
    p.WriteFileRequest("/tmp/x", b"\x00\x01data\x00", mode=0o4755, append=True, mkdirs=True),
    p.WriteFileRequest("/tmp/empty", b""),
    p.ReadFileRequest("/etc/hostname", offset=2**64 - 1, max_len=p.MAX_READ_LEN),
    p.SetClockRequest(1_700_000_000, 999_999_999),
    p.ShutdownRequest(p.ShutdownHow.REBOOT),
    p.Ready("pclite-agent/1", "6.1.0-pclite"),
    p.ErrorReply(-5, "negative errno survives"),
    p.Started(4_000_000_000),
    p.ExitStatus(p.ExitKind.EXITED, -1, stdout_truncated=True, stderr_truncated=True, duration_us=2**64 - 1),
])
def test_payload_round_trip(message):
    assert type(message).decode(message.encode()) == message
    frame = p.Frame(message.TYPE, 42, message.encode())
    assert p.decode_payload(p.FrameDecoder().feed(frame.encode())[0]) == message


def test_exec_payload_layout():
    request = p.ExecRequest(("ls", "-l"), cwd="/root", env=("A=b",), timeout_ms=1000, output_cap=64, stdin=True)
    assert request.encode() == struct.pack("<IIIHH", 1000, 64, 1, 2, 1) + b"/root\0ls\0-l\0A=b\0"
    assert request.frame(9) == p.Frame(p.MsgType.EXEC, 9, request.encode())
    assert p.ExecRequest(("x",)).encode() == struct.pack("<IIIHH", 0, 0, 0, 1, 0) + b"/\0x\0"


def test_other_payload_layouts():
    assert p.ExitStatus(p.ExitKind.SIGNALED, 9, True, False, True, 5).encode() == struct.pack("<BBBBiQ", 1, 1, 0, 1,
                                                                                               9, 5)
    assert p.ErrorReply(2, "open /x: No such file or directory").encode() == (
        b"\x02\0\0\0open /x: No such file or directory\0")
    assert p.WriteFileRequest("/f", b"zz", mode=0o600, mkdirs=True).encode() == struct.pack("<II", 0o600, 2) + b"/f\0zz"
    assert p.ReadFileRequest("/f", 3, 10).encode() == struct.pack("<QI", 3, 10) + b"/f\0"
    assert p.SetClockRequest.from_ns(1_500_000_000_123) == p.SetClockRequest(1500, 123)
    assert p.set_hostname(1, "box").payload == b"box"
    assert p.Ready.decode(b"pclite-agent/1 6.1.0 extra") == p.Ready("pclite-agent/1", "6.1.0 extra")


def test_raw_payload_frames_decode_to_bytes():
    for type_ in (p.MsgType.OK, p.MsgType.STDOUT, p.MsgType.STDERR, p.MsgType.DATA, p.MsgType.PING, 0x99):
        assert p.decode_payload(p.Frame(type_, 1, b"raw")) == b"raw"


@pytest.mark.parametrize(("cls", "payload", "match"), [
    (p.ExecRequest, b"\0" * 15, "EXEC payload of 15 bytes is too short"),
    (p.ExecRequest, struct.pack("<IIIHH", 0, 0, 0, 2, 0) + b"/\0ls\0-l", "before the NUL that terminates its argv"),
    (p.ExecRequest, struct.pack("<IIIHH", 0, 0, 0, 1, 1) + b"/\0ls\0", "terminates its env"),
    (p.ExecRequest, struct.pack("<IIIHH", 0, 0, 0, 1, 0) + b"\xff\0ls\0", "cwd is not valid UTF-8"),
    (p.ExitStatus, b"\0" * 15, "EXIT payload"),
    (p.ExitStatus, struct.pack("<BBBBiQ", 7, 0, 0, 0, 0, 0), "EXIT kind 7"),
    (p.ErrorReply, b"\x01\0\0\0no terminator", "ERROR payload ends"),
    (p.Started, b"\x01", "STARTED"),
    (p.ReadFileRequest, struct.pack("<QI", 0, 1) + b"/path", "terminates its path"),
    (p.ShutdownRequest, struct.pack("<I", 2), "SHUTDOWN how 2"),
    (p.Ready, b"hello", "not 'pclite-agent/<n> <kernel release>'"),
    (p.Ready, b"\xff\xfe", "not UTF-8"),
])
def test_malformed_payloads_are_protocol_errors(cls, payload, match):
    with pytest.raises(p.ProtocolError, match=match):
        cls.decode(payload)


@pytest.mark.parametrize(("build", "match"), [
    (lambda: p.ExecRequest(()), "at least argv"),
    (lambda: p.ExecRequest(("a\0b",)), "contains a NUL"),
    (lambda: p.ExecRequest(("true",), env=("NOEQUALS",)), "not K=V"),
    (lambda: p.ExecRequest(("true",), timeout_ms=2**32), "cannot encode EXEC"),
    (lambda: p.ExecRequest(("x",) * 65536), "cannot encode EXEC"),
    (lambda: p.ReadFileRequest("/f", max_len=p.MAX_READ_LEN + 1), "max_len"),
    (lambda: p.SetClockRequest(0, 1_000_000_000), "nanoseconds"),
    (lambda: p.SignalRequest(-1), "cannot encode SIGNAL"),
    (lambda: p.WriteFileRequest("/a\0b", b""), "contains a NUL"),
])
def test_unencodable_values_are_protocol_errors(build, match):
    with pytest.raises(p.ProtocolError, match=match):
        build().encode()


def test_set_hostname_rejects_nul():
    with pytest.raises(p.ProtocolError, match="NUL"):
        p.set_hostname(1, "a\0b")
