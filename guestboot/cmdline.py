"""The kernel command line as the bytes the VMM places at CMDLINE_ADDR."""

from __future__ import annotations

from guestboot.layout import CMDLINE_MAX
from guestboot.plan import LoaderError


def encode_cmdline(text: str, limit: int = CMDLINE_MAX - 1) -> bytes:
    """NUL-terminated ASCII; `limit` is the longest text accepted (the kernel's buffer minus the NUL)."""
    for offset, char in enumerate(text):
        if char == "\0":
            raise LoaderError(f"kernel command line has a NUL byte at offset {offset}: remove it")
        if not " " <= char <= "~":
            raise LoaderError(f"kernel command line has a non-printable or non-ASCII character {char!r} at offset "
                              f"{offset}: use printable ASCII only")
    if len(text) > limit:
        raise LoaderError(f"kernel command line is {len(text)} bytes, the limit is {limit} (plus the NUL): "
                          f"shorten it")
    return text.encode("ascii") + b"\0"
