"""bzImage: the x86 boot protocol setup header (Documentation/x86/boot.rst) and the compressed vmlinux payload.

Only what a firmware-less 64-bit loader needs: the 16-bit setup code is never run, the protected-mode part is
loaded at pref_address and entered at its 64-bit entry (+0x200), or its payload is unpacked on the host.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from guestboot.plan import LoaderError

SECTOR = 512
HDR_START = 0x1F1          # struct setup_header inside the image and inside boot_params
HDR_STRUCT_END = 0x290     # boot_params._pad7 starts here: the header never extends further
HDR_MIN_END = 0x26C        # end of the fields this module reads (protocol 2.12+ layout)
BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x020A      # 2.10: pref_address, init_size
DEFAULT_SETUP_SECTS = 4    # setup_sects == 0 means 4 (very old kernels)
ENTRY64_OFFSET = 0x200     # startup_64 relative to the protected-mode code

XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK_MAX = 8 << 20  # lz4 -l: every block decompresses to at most 8 MiB
ZSTD_MAX_WINDOW = 1 << 31       # zstd -22 --ultra (kernel builds) may exceed the library's default limit
# Unpacking stops at the kernel's init_size (what it needs in memory, bss included) plus room for the ELF's headers
# and 2 MiB segment alignment, and never past UNPACK_MAX whatever the header claims: a bomb is refused early.
UNPACK_SLACK = 8 << 20
UNPACK_MAX = 256 << 20
_CHUNK = 1 << 20                # output per decompressor call (zlib, xz, lzma, bzip2)
_ZSTD_PIECE = 256               # compressed input per zstd call: at most ~8 MiB of output (RLE blocks)

# (magic, name) in detection order; the kernel's Makefile appends a le32 uncompressed size to most of them.
COMPRESSIONS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x89LZO", "lzo"),
)

_U8, _U16, _U32, _U64 = "<B", "<H", "<I", "<Q"
# setup_header fields this loader reads: name -> (offset in the image, struct format)
_FIELDS = {
    "setup_sects": (0x1F1, _U8),
    "syssize": (0x1F4, _U32),
    "boot_flag": (0x1FE, _U16),
    "jump": (0x200, _U16),
    "version": (0x206, _U16),
    "kernel_version": (0x20E, _U16),
    "loadflags": (0x211, _U8),
    "code32_start": (0x214, _U32),
    "initrd_addr_max": (0x22C, _U32),
    "kernel_alignment": (0x230, _U32),
    "relocatable_kernel": (0x234, _U8),
    "min_alignment": (0x235, _U8),
    "xloadflags": (0x236, _U16),
    "cmdline_size": (0x238, _U32),
    "payload_offset": (0x248, _U32),
    "payload_length": (0x24C, _U32),
    "pref_address": (0x258, _U64),
    "init_size": (0x260, _U32),
    "handover_offset": (0x264, _U32),
}


class SetupHeader(namedtuple("SetupHeader", (
    "setup_sects",       # 512-byte sectors of real-mode setup after the boot sector (0 already mapped to 4)
    "syssize",
    "boot_flag",
    "jump",
    "version",           # boot protocol, e.g. 0x020F
    "kernel_version",    # offset - 0x200 of the version string
    "loadflags",
    "code32_start",
    "initrd_addr_max",
    "kernel_alignment",
    "relocatable_kernel",
    "min_alignment",
    "xloadflags",
    "cmdline_size",      # longest command line the kernel accepts, without the NUL
    "payload_offset",    # relative to the protected-mode code
    "payload_length",
    "pref_address",
    "init_size",         # memory from the load address the kernel needs until it has relocated itself
    "handover_offset",
    "header_end",        # 0x202 + the jump byte at 0x201: where the header bytes to copy end
))):
    __slots__ = ()

    @property
    def protocol(self) -> str:
        return protocol_name(self.version)

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode code: boot sector + setup sectors."""
        return (self.setup_sects + 1) * SECTOR


def protocol_name(version: int) -> str:
    """0x020F -> "2.15", as boot.rst writes them."""
    return f"{version >> 8}.{version & 0xFF:02d}"


def parse_setup_header(image: bytes | memoryview) -> SetupHeader:
    """Validate and decode the setup header of a 64-bit bzImage."""
    image = memoryview(image)
    if len(image) < HDR_STRUCT_END:
        raise LoaderError(f"bzImage truncated: {len(image)} bytes, the setup header needs at least "
                          f"{HDR_STRUCT_END}: is the file complete?")
    values = {name: struct.unpack_from(fmt, image, offset)[0] for name, (offset, fmt) in _FIELDS.items()}
    if values["boot_flag"] != BOOT_FLAG:
        raise LoaderError(f"not a bzImage: boot_flag at 0x1FE is {values['boot_flag']:#06x}, expected 0xAA55; "
                          f"pass a bzImage or an ELF vmlinux")
    magic = bytes(image[0x202:0x206])
    if magic != HDRS_MAGIC:
        raise LoaderError(f"not a bzImage: no 'HdrS' magic at 0x202 (found {magic!r}); "
                          f"pass a bzImage or an ELF vmlinux")
    version = values["version"]
    if version < MIN_PROTOCOL:
        raise LoaderError(f"bzImage boot protocol {protocol_name(version)} is too old: pclite needs 2.10 "
                          f"or newer (Linux 2.6.31+), use a newer kernel")
    if not values["xloadflags"] & XLF_KERNEL_64:
        raise LoaderError(f"bzImage has no 64-bit entry (xloadflags {values['xloadflags']:#x} lacks XLF_KERNEL_64): "
                          f"build an x86_64 kernel (boot protocol 2.12+)")
    if values["setup_sects"] == 0:
        values["setup_sects"] = DEFAULT_SETUP_SECTS
    header_end = min(0x202 + image[0x201], HDR_STRUCT_END)
    if header_end < HDR_MIN_END:
        raise LoaderError(f"bzImage setup header ends at {header_end:#x} (jump byte at 0x201), before the 2.12 "
                          f"fields end at {HDR_MIN_END:#x}: the image is corrupt")
    header = SetupHeader(**values, header_end=header_end)
    if len(image) <= header.setup_size:
        raise LoaderError(f"bzImage truncated: {len(image)} bytes but setup alone is {header.setup_size} bytes "
                          f"({header.setup_sects} sectors + boot sector): is the file complete?")
    pm_length = len(image) - header.setup_size
    if header.payload_length == 0 or header.payload_offset + header.payload_length > pm_length:
        raise LoaderError(f"bzImage payload [{header.payload_offset:#x}, +{header.payload_length:#x}) is empty or "
                          f"past the end of the {pm_length}-byte protected-mode code: the image is truncated")
    return header


def header_bytes(image: bytes | memoryview, header: SetupHeader) -> memoryview:
    """The setup header as the kernel expects it copied into boot_params at 0x1F1."""
    return memoryview(image)[HDR_START:header.header_end]


def protected_mode_code(image: bytes | memoryview, header: SetupHeader) -> memoryview:
    """What is loaded at the load address: everything after the real-mode setup, without copying."""
    return memoryview(image)[header.setup_size:]


def kernel_version_string(image: bytes | memoryview, header: SetupHeader) -> str | None:
    """The "6.1.0 (user@host) #1 ..." banner the setup header points at, if present."""
    if not header.kernel_version:
        return None
    start = header.kernel_version + 0x200
    chunk = bytes(memoryview(image)[start:min(start + 256, header.setup_size)])
    text = chunk.split(b"\0", 1)[0]
    return text.decode("ascii", "replace") or None


def detect_compression(data: bytes | memoryview) -> str:
    head = bytes(data[:6])
    for magic, name in COMPRESSIONS:
        if head.startswith(magic):
            return name
    raise LoaderError(f"bzImage payload has an unknown compression (first bytes {head.hex(' ')}): "
                      f"expected gzip, xz, lzma, bzip2, lz4 or zstd")


def payload(image: bytes | memoryview) -> tuple[str, memoryview]:
    """(compression name, compressed vmlinux) of a bzImage, without copying."""
    header = parse_setup_header(image)
    start = header.setup_size + header.payload_offset
    data = memoryview(image)[start:start + header.payload_length]
    return detect_compression(data), data


def unpack_limit(header: SetupHeader) -> int:
    """The most bytes the payload may unpack to (see UNPACK_SLACK)."""
    return min(header.init_size + UNPACK_SLACK, UNPACK_MAX)


def unpack_bzimage(image: bytes | memoryview) -> bytes:
    """Decompress the payload on the host: the vmlinux ELF the bzImage would have unpacked in the guest."""
    name, data = payload(image)
    if name == "lzo":
        raise LoaderError("bzImage payload is LZO-compressed, which pclite cannot unpack: rebuild the kernel with "
                          "CONFIG_KERNEL_LZ4 (or GZIP/XZ/ZSTD), or boot it with boot='bzimage'")
    header = parse_setup_header(image)
    out = _Output(name, unpack_limit(header), header.init_size)
    try:
        vmlinux = _DECOMPRESSORS[name](data, out)
    except LoaderError:
        raise
    except Exception as error:  # each library has its own exception types; all mean a corrupt payload
        raise LoaderError(f"cannot unpack the {name} payload of the bzImage ({error}): the image is corrupt") from None
    if not vmlinux.startswith(b"\x7fELF"):
        raise LoaderError(f"the {name} payload of the bzImage unpacked to {len(vmlinux)} bytes that are not an ELF "
                          f"vmlinux (first bytes {vmlinux[:4].hex(' ')}): the image is corrupt")
    return vmlinux


class _Output:
    """Unpacked bytes so far; past the limit, one clear refusal (the rest is never decompressed)."""

    def __init__(self, name: str, limit: int, init_size: int):
        self.name, self.limit, self.init_size = name, limit, init_size
        self.data = bytearray()

    def add(self, chunk) -> None:
        if len(self.data) + len(chunk) > self.limit:  # checked first: the refused chunk is never appended
            self.data = bytearray()
            raise LoaderError(f"the {self.name} payload of the bzImage unpacks to more than {self.limit} bytes "
                              f"(its init_size is {self.init_size}): refused as a decompression bomb")
        self.data += chunk

    def done(self, rest: bytes) -> bytes:
        return _check_trailer(self.name, bytes(self.data), rest)


def _check_trailer(name: str, out: bytes, rest: bytes) -> bytes:
    # The kernel Makefile appends the uncompressed size (le32); other trailing bytes are tolerated.
    if len(rest) == 4 and int.from_bytes(rest, "little") != len(out) & 0xFFFFFFFF:
        raise LoaderError(f"the {name} payload unpacked to {len(out)} bytes but its size trailer says "
                          f"{int.from_bytes(rest, 'little')}: the bzImage is corrupt")
    return out


def _truncated(name: str) -> LoaderError:
    return LoaderError(f"the {name} payload of the bzImage ends before its end-of-stream marker: "
                       f"the image is truncated")


def _stream(decompressor, data: memoryview, out: _Output) -> bytes:
    """lzma/bz2 decompressors: max_length bounds each call's output."""
    chunk = decompressor.decompress(data, max_length=_CHUNK)
    while True:
        out.add(chunk)
        if decompressor.eof:
            return out.done(decompressor.unused_data)
        if decompressor.needs_input:
            raise _truncated(out.name)
        chunk = decompressor.decompress(b"", max_length=_CHUNK)


def _gzip(data: memoryview, out: _Output) -> bytes:
    import zlib  # decompressors are imported on use: the VMM's start-up path must stay lean
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending = data
    while True:
        chunk = decompressor.decompress(pending, _CHUNK)
        out.add(chunk)
        if decompressor.eof:
            return out.done(decompressor.unused_data)
        pending = decompressor.unconsumed_tail
        if not pending and not chunk:  # input used up, nothing more buffered inside
            raise _truncated(out.name)


def _xz(data: memoryview, out: _Output) -> bytes:
    import lzma
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_XZ), data, out)


def _lzma(data: memoryview, out: _Output) -> bytes:
    import lzma
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), data, out)


def _bzip2(data: memoryview, out: _Output) -> bytes:
    import bz2
    return _stream(bz2.BZ2Decompressor(), data, out)


def _zstd(data: memoryview, out: _Output) -> bytes:
    # decompressobj copes with frames that do not record their content size (zstd reading from a pipe); it has no
    # max_length, so it is fed small pieces: each can unpack to a few MiB at most
    import zstandard
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
    for offset in range(0, len(data), _ZSTD_PIECE):
        out.add(decompressor.decompress(data[offset:offset + _ZSTD_PIECE]))
        if decompressor.eof:
            return out.done(decompressor.unused_data + bytes(data[offset + _ZSTD_PIECE:]))
    raise _truncated(out.name)


def _lz4(data: memoryview, out: _Output) -> bytes:
    """lz4 -l (legacy) frames: magic, then [le32 compressed size][block]...; the magic again starts a new frame."""
    import lz4.block
    offset = 4  # detect_compression saw the magic
    while len(data) - offset >= 4:
        size = int.from_bytes(data[offset:offset + 4], "little")
        offset += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size > len(data) - offset:
            if offset == len(data):  # the last 4 bytes are the Makefile's size trailer, not a block
                return out.done(bytes(data[offset - 4:]))
            raise LoaderError(f"lz4 block at payload offset {offset - 4:#x} claims {size} bytes but only "
                              f"{len(data) - offset} remain: the bzImage is truncated")
        out.add(lz4.block.decompress(data[offset:offset + size], uncompressed_size=LZ4_LEGACY_BLOCK_MAX))
        offset += size
    return bytes(out.data)


_DECOMPRESSORS = {"gzip": _gzip, "xz": _xz, "lzma": _lzma, "bzip2": _bzip2, "zstd": _zstd, "lz4": _lz4}
