"""pclited's rootfs step on the host: the ext4 image mke2fs builds from a directory (read back with debugfs), and the
POST /v1/vms/{id}/rootfs contract's refusals (the attach itself needs a booted VM: tests/guest/test_oci.py)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from service.services import rootfs
from service.services.errors import Invalid
from tests.support.servers import Pclited, short_tmpdir
from tests.unit.test_service_api import assert_problem

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("debugfs") is None,
                                reason="e2fsprogs (mke2fs, debugfs) is not installed: make deps")


def debugfs(image, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + b"x" * 10000)
    (root / "bin" / "tool").chmod(0o4755)
    (root / "bin" / "sh").symlink_to("tool")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("inside\n")
    return root


def test_image_holds_the_tree_with_modes_and_links(tree, tmp_path):
    image = tmp_path / "rootfs.ext4"
    info = rootfs.build_image(tree, image)
    assert info["size_mib"] >= rootfs.DEFAULT_FREE_MIB and info["files"] == 6
    assert image.stat().st_size == info["size_mib"] << 20 and info["image_bytes"] == image.stat().st_size
    listing = debugfs(image, "ls -l /bin")
    assert "104755" in listing and " tool" in listing and "120777" in listing  # setuid file, symlink
    assert debugfs(image, "cat /etc/hostname") == "inside\n"
    assert "has_journal" not in debugfs(image, "features")


def test_explicit_size_and_a_size_too_small(tree, tmp_path):
    info = rootfs.build_image(tree, tmp_path / "a.ext4", size_mib=40)
    assert info["size_mib"] == 40 and (tmp_path / "a.ext4").stat().st_size == 40 << 20
    with pytest.raises(Invalid, match="too small for this rootfs"):
        rootfs.build_image(tree, tmp_path / "b.ext4", size_mib=1)
    assert not (tmp_path / "b.ext4").exists()


@pytest.fixture(scope="module")
def server():
    workdir = short_tmpdir()
    service = Pclited(workdir / "data", health_interval_s=3600)
    service.start()
    yield service
    service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def test_api_refuses_what_it_cannot_attach(server, tree):
    with server.client() as api:
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": str(tree)}), 404, "vm-000000000000")
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": "relative/dir"}), 422,
                       "absolute path to a directory", "tar stream")
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"nope": 1}), 422, "path")
        proc = {"source": "proc", "target": "/rootfs/proc", "fstype": "proc", "flags": 14}
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": str(tree), "mounts": [proc],
                                                                        "hostname": "box"}), 404, "vm-000000000000")
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": str(tree), "mounts": [
            {**proc, "target": "relative"}]}), 422, "mounts")
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": str(tree), "hostname": "x" * 65}),
                       422, "hostname")
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", content=b"x", headers={"Content-Type": "text/plain"}),
                       422, "application/x-tar")
        big = _tar({"bin/sh": b"x" * (2 << 20)})  # over the 1 MiB body cap of other routes: streamed, not refused
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", content=big,
                                headers={"Content-Type": "application/x-tar"}), 404, "vm-000000000000")
        assert_problem(api.post("/v1/vms/vm-000000000000/exec", content=b"x" * (30 << 20),
                                headers={"Content-Type": "application/json"}), 413)


async def _chunks(data: bytes, size: int = 4096):
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


def test_tar_stream_unpacks_and_junk_or_escapes_are_refused(tmp_path):
    import asyncio
    service = rootfs.RootfsService(rt=None)
    target = tmp_path / "unpacked"
    got = asyncio.run(service._unpack(_chunks(_tar({"bin/sh": b"shell", "etc/hostname": b"h\n"})), target))
    assert got > 0 and (target / "bin" / "sh").read_bytes() == b"shell"
    with pytest.raises(Invalid, match="not a tar stream"):
        asyncio.run(service._unpack(_chunks(b"this is not a tar file" * 100), tmp_path / "junk"))
    with pytest.raises(Invalid, match="empty body"):
        asyncio.run(service._unpack(_chunks(b""), tmp_path / "empty"))
    with pytest.raises(Invalid, match="contains '..'"):
        asyncio.run(service._unpack(_chunks(_tar({"../escaped": b"x", "ok": b"y"})), tmp_path / "esc" / "in"))
    assert not (tmp_path / "esc" / "escaped").exists()


def test_image_cache_hits_for_the_same_tree_and_misses_after_a_change(tree, tmp_path):
    cache = tmp_path / "cache"
    first = rootfs.build_image(tree, tmp_path / "1.ext4", cache=cache)
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)  # a new snapshot of the same image: new inodes, same metadata
    os.utime(copy / "etc", ns=(1, 1))  # but the directories' mtimes of copy time, as containerd's native snapshots
    os.utime(copy, ns=(2, 2))
    second = rootfs.build_image(copy, tmp_path / "2.ext4", cache=cache)
    assert (first["cached"], second["cached"]) == (False, True)
    assert (tmp_path / "1.ext4").read_bytes() == (tmp_path / "2.ext4").read_bytes()
    assert os.stat(tmp_path / "2.ext4").st_blocks * 512 < second["image_bytes"] // 4  # the holes stayed holes
    entry = Path(second["cache_entry"])
    rootfs.make_spare_in_background(entry).join(30)  # what an attach leaves for the next hit
    assert rootfs.spare_path(entry).exists()
    spare_inode = os.stat(rootfs.spare_path(entry)).st_ino
    again = rootfs.build_image(copy, tmp_path / "2b.ext4", cache=cache)
    assert again["cached"] and os.stat(tmp_path / "2b.ext4").st_ino == spare_inode  # renamed, not copied
    assert (tmp_path / "2b.ext4").read_bytes() == (tmp_path / "1.ext4").read_bytes()
    assert not rootfs.spare_path(entry).exists()
    (copy / "etc" / "hostname").write_text("changed\n")
    third = rootfs.build_image(copy, tmp_path / "3.ext4", cache=cache)
    assert not third["cached"] and debugfs(tmp_path / "3.ext4", "cat /etc/hostname") == "changed\n"
    assert len(list(cache.glob("*.ext4"))) == 2


def test_runtime_streams_a_rootfs_tar_when_pclited_cannot_see_the_path(server, tree, monkeypatch):
    """The runtime's fallback for a pclited on another machine: the same refusal (404, no such VM) comes back after
    a chunked tar upload of the whole tree, read by pclited's streaming route."""
    from service.runtime.transport import Pclited as Client
    from service.runtime.transport import WireError
    client = Client(server.url, server.token)
    with pytest.raises(WireError, match="vm-000000000000") as info:
        client.upload_rootfs("vm-000000000000", str(tree), read_only=True)
    assert info.value.status == 404
    monkeypatch.setenv("PCLITE_ROOTFS_UPLOAD", "auto")
    with pytest.raises(WireError, match="vm-000000000000"):
        client.attach_rootfs("vm-000000000000", "/no/such/dir/on/the/pclited/host", False)
