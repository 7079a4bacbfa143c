"""Decompression bombs in a bzImage: unpacking stops at the kernel's init_size (+ slack), with one clear line, and
the peak RSS of the process unpacking stays under 2x init_size (measured in a fresh interpreter: VmHWM, which exec
resets, unlike ru_maxrss that keeps the forking parent's size)."""

from __future__ import annotations

import subprocess
import sys
import zlib

import lz4.block
import pytest
import zstandard

from guestboot.bzimage import UNPACK_MAX, UNPACK_SLACK, parse_setup_header, unpack_limit

INIT_SIZE = 64 << 20
BOMB = 1 << 30  # what the payload would unpack to


def gzip_bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(16 << 20)
    return b"".join([compressor.compress(zeros) for _ in range(BOMB // len(zeros))] + [compressor.flush()])


def zstd_bomb() -> bytes:
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(16 << 20)
    return b"".join([compressor.compress(zeros) for _ in range(BOMB // len(zeros))] + [compressor.flush()])


def lz4_bomb() -> bytes:
    block = lz4.block.compress(bytes(8 << 20), store_size=False)
    return (b"\x02\x21\x4c\x18" + (len(block).to_bytes(4, "little") + block) * (BOMB // (8 << 20))
            + BOMB.to_bytes(4, "little"))


UNPACK_AND_MEASURE = """
import sys
from guestboot.bzimage import unpack_bzimage
from guestboot.plan import LoaderError
import lz4.block, zstandard  # imported before measuring: their code is not the bomb's doing
image = open(sys.argv[1], "rb").read()
def peak_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
before = peak_kib()
try:
    unpack_bzimage(image)
    print("unpacked")
except LoaderError as exc:
    print(str(exc))
print(before, peak_kib())
"""


@pytest.mark.parametrize("make", [gzip_bomb, zstd_bomb, lz4_bomb], ids=["gzip", "zstd", "lz4"])
def test_bomb_refused_with_bounded_peak_rss(make, images, tmp_path):
    payload = make()
    image = images.bzimage(payload=payload, init_size=INIT_SIZE)
    assert len(image) < 8 << 20  # a small image ...
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    out = subprocess.run([sys.executable, "-c", UNPACK_AND_MEASURE, str(path)], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert len(out) == 2, out
    assert "refused as a decompression bomb" in out[0] and f"more than {INIT_SIZE + UNPACK_SLACK} bytes" in out[0]
    _, peak_kib = map(int, out[1].split())
    print(f"{len(image)}-byte image: {out[0]}; peak RSS {peak_kib} KiB")
    assert peak_kib * 1024 < 2 * INIT_SIZE, f"peak RSS {peak_kib} KiB for init_size {INIT_SIZE} ({out})"


def test_limit_follows_init_size_but_never_passes_the_fixed_maximum(images):
    assert unpack_limit(parse_setup_header(images.bzimage(init_size=16 << 20))) == (16 << 20) + UNPACK_SLACK
    assert unpack_limit(parse_setup_header(images.bzimage(init_size=0xFFFFF000))) == UNPACK_MAX
