"""pclited's rootfs step on the host: the ext4 image mke2fs builds from a directory (read back with debugfs), and the
POST /v1/vms/{id}/rootfs contract's refusals (the attach itself needs a booted VM: tests/guest/test_oci.py)."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from service.services import rootfs
from service.services.errors import Forbidden, Invalid, TooLarge
from tests.support.servers import Pclited, running_pclited, short_tmpdir
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
def roots():
    """Two allowed roots; a tree inside the first, an escape through a symlink, a secret outside both."""
    workdir = short_tmpdir()
    allowed, other, outside = workdir / "allowed", workdir / "other", workdir / "outside"
    (allowed / "bundle" / "rootfs" / "etc").mkdir(parents=True)
    (allowed / "bundle" / "rootfs" / "etc" / "hostname").write_text("inside\n")
    other.mkdir()
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "shadow").write_text("root:$6$hash\n")
    (allowed / "bundle" / "escape").symlink_to(outside / "secret")  # absolute
    (allowed / "bundle" / "up").symlink_to("../../outside/secret")  # relative
    (allowed / "bundle" / "inside").symlink_to("rootfs")  # stays beneath: allowed
    yield workdir, [allowed, other]
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(roots):
    workdir = short_tmpdir()
    service = Pclited(workdir / "data", health_interval_s=3600,
                      rootfs_path_roots=json.dumps([str(root) for root in roots[1]]))
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


def test_api_refuses_what_it_cannot_attach(server, roots):
    tree = roots[1][0] / "bundle" / "rootfs"
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
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", params={"size_mib": 5000},
                                content=big, headers={"Content-Type": "application/x-tar"}), 413, "rootfs_max_bytes")


def test_rootfs_paths_outside_the_roots_are_forbidden(server, roots):
    """/etc (the hole: an image of it with /etc/shadow), `..`, symlinks out (absolute and relative): 403, and
    nothing lands in the rootfs cache. A symlink that stays beneath the root is followed."""
    allowed = roots[1][0]
    with server.client() as api:
        for path in ("/etc", f"{allowed}/../outside/secret", f"{allowed}/bundle/escape", f"{allowed}/bundle/up",
                     f"{allowed}/bundle/escape/../../outside/secret", f"{allowed}x"):
            assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": path}), 403, path)
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": f"{allowed}/bundle/inside"}), 404,
                       "vm-000000000000")
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": f"{allowed}/bundle/none"}), 422,
                       "pclited host")
    assert not (server.data_dir / "rootfs-cache").exists()


def test_without_roots_the_path_form_is_off(tree):
    with running_pclited(health_interval_s=3600) as service, service.client() as api:
        body = assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": "/etc"}), 403,
                              "rootfs_path_roots", "PCLITE_ROOTFS_PATH_ROOTS", "tar stream")
        assert body["type"] == "urn:pclite:problem:forbidden"
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", json={"path": str(tree)}), 403, "rootfs_path_roots")
        # a JSON rootfs body is capped like every other (it was read whole: 200 MiB)
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", content=b"{" + b" " * (2 << 20) + b"}",
                                headers={"Content-Type": "application/json"}), 413, "1048576")

        def chunked():
            for _ in range(40):
                yield b" " * (64 << 10)
        assert_problem(api.post("/v1/vms/vm-000000000000/rootfs", content=chunked(),
                                headers={"Content-Type": "application/json"}), 413)
        assert not (service.data_dir / "rootfs-cache").exists()


def test_open_beneath_gives_the_directory_itself(roots, tmp_path):
    """The fd is what the image is built from (via /proc/self/fd/N in mke2fs): the checked directory, not what its
    path names later. Without openat2 (old kernels) the component walk refuses every symlink."""
    allowed = roots[1][0]
    fd = rootfs.open_beneath(roots[1], f"{allowed}/bundle/rootfs")
    try:
        moved = tmp_path / "moved"
        os.rename(allowed / "bundle" / "rootfs", moved)  # the path now names nothing
        info = rootfs.build_image(Path(f"/proc/self/fd/{fd}"), tmp_path / "img", pass_fds=(fd,))
        assert info["files"] == 3 and debugfs(tmp_path / "img", "cat /etc/hostname") == "inside\n"
    finally:
        os.close(fd)
        os.rename(moved, allowed / "bundle" / "rootfs")
    root_fd = os.open(allowed, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(rootfs._walk_beneath(root_fd, "bundle/rootfs/etc", os.O_RDONLY | os.O_DIRECTORY))
        for path in ("bundle/escape", "bundle/inside", "../outside", "bundle/rootfs/../../.."):
            with pytest.raises(OSError) as info:
                rootfs._walk_beneath(root_fd, path, os.O_RDONLY | os.O_DIRECTORY)
            assert info.value.errno in (errno.EXDEV, errno.ELOOP), path
    finally:
        os.close(root_fd)
    with pytest.raises(Forbidden, match="rootfs_path_roots"):
        rootfs.open_beneath([], str(allowed))


async def _chunks(data: bytes, size: int = 4096):
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


def test_tar_stream_unpacks_and_junk_or_escapes_are_refused(tmp_path):
    target = tmp_path / "unpacked"
    got, script = asyncio.run(rootfs.RootfsService._unpack(_chunks(_tar({"bin/sh": b"shell", "etc/hostname": b"h\n"})),
                                                           target, 1 << 30))
    assert got > 0 and (target / "bin" / "sh").read_bytes() == b"shell"
    for body, why in ((b"this is not a tar file" * 100, "not a tar stream"), (b"", "empty"),
                      (_tar({"../escaped": b"x", "ok": b"y"}), "contains '..'")):
        with pytest.raises(Invalid, match=why):
            asyncio.run(rootfs.RootfsService._unpack(_chunks(body), tmp_path / "bad" / "in", 1 << 30))
        assert not (tmp_path / "bad" / "in").exists(), "nothing left behind"
    assert not (tmp_path / "bad" / "escaped").exists()


def _hostile_tar(path: Path, sparse_bytes: int) -> None:
    """A real tar: GNU tar's sparse member (a 64 GiB hole costs a few KiB of tar), then crafted members a host
    unpack as root would have made: a device node, a setuid/setgid root file, a file of another user, a FIFO, a
    symlink out of the tree and a file written through it, a hard link to /etc/shadow."""
    src = path.parent / "sparse-src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate(sparse_bytes)
        f.write(b"head")
    subprocess.run(["tar", "-C", str(src), "--sparse", "--numeric-owner", "-cf", str(path), "huge"], check=True)
    with tarfile.open(path) as tar:
        tar.getmembers()
        cut = tar.offset  # where the end-of-archive blocks start: ours go there
    data = path.read_bytes()
    ours = io.BytesIO()
    with tarfile.open(fileobj=ours, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name, kind=tarfile.REGTYPE, data=b"", **attrs):
            member = tarfile.TarInfo(name)
            member.type, member.size = kind, len(data)
            for key, value in attrs.items():
                setattr(member, key, value)
            tar.addfile(member, io.BytesIO(data) if data else None)
        add("dev", tarfile.DIRTYPE, mode=0o755)
        add("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6)
        add("dev/mem", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=1)
        add("dev/fifo", tarfile.FIFOTYPE, mode=0o600)
        add("bin/su", data=b"\x7fELF-su", mode=0o6755, uid=0, gid=0)
        add("home/u/file", data=b"theirs", mode=0o600, uid=4321, gid=4321)
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        add("out", tarfile.SYMTYPE, linkname="/etc")
        add("shadow", tarfile.LNKTYPE, linkname="../../../../etc/shadow")
    path.write_bytes(data[:cut] + ours.getvalue())


def _host_specials(root: Path) -> list[str]:
    """Anything in a host tree a user other than pclited could use: not a plain directory or file, setuid/setgid/
    sticky, writable by group or others, owned by someone else."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) or st.st_mode & 0o7022 \
                    or (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                found.append(f"{os.path.join(dirpath, name)} {st.st_mode:o} {st.st_uid}:{st.st_gid}")
    return found


def test_a_hostile_tar_makes_nothing_dangerous_on_the_host(tmp_path):
    """The whole hostile tar (device nodes, setuid, a foreign owner, a FIFO, links out) under quota: the host tree
    holds plain files owned by pclited; the image holds them as the tar said; the escapes are refused."""
    hostile = tmp_path / "hostile.tar"
    _hostile_tar(hostile, sparse_bytes=64 << 20)
    data = hostile.read_bytes()
    assert len(data) < 64 << 10
    target = tmp_path / "unpack"
    with pytest.raises(Invalid, match="'shadow'.s hard link target '../../../../etc/shadow' contains '..'"):
        asyncio.run(rootfs.RootfsService._unpack(_chunks(data), target, 4 << 30))
    assert not target.exists()
    # without the hard link out: everything else unpacks
    member_at = data.index(b"shadow\0")
    got, script = asyncio.run(rootfs.RootfsService._unpack(_chunks(data[:member_at] + bytes(1024)), target, 4 << 30))
    assert _host_specials(target) == []
    huge = os.stat(target / "huge")
    assert huge.st_size == 64 << 20 and huge.st_blocks * 512 < 1 << 20, "the hole stayed a hole"
    image = tmp_path / "rootfs.ext4"
    rootfs.build_image(target, image, script=script, max_bytes=4 << 30)
    listing = {line.split()[-1]: line.split() for line in debugfs(image, "ls -l /dev").splitlines() if line.strip()}
    assert listing["sda"][1] == "60660" and listing["mem"][1] == "20666" and listing["fifo"][1] == "10600"
    assert "Device major/minor number: 08:00" in debugfs(image, "stat /dev/sda")
    assert "Group:     6" in debugfs(image, "stat /dev/sda")
    assert debugfs(image, "ls -l /bin").split("\n")[2].split()[1] == "106755"
    assert "User:  4321   Group:  4321" in debugfs(image, "stat /home/u/file")
    assert "Type: symlink" in debugfs(image, "stat /out") and 'Fast link dest: "/etc"' in debugfs(image, "stat /out")
    assert "Mode:  01777" in debugfs(image, "stat /tmp")
    # a member written through the symlink out of the tree, and one under a device node
    for extra, why in (({"out/passwd": b"x"}, "lies beneath 'out'"), ({"dev/mem/x": b"x"}, "lies beneath 'dev/mem'")):
        tail = _tar(extra)
        with pytest.raises(Invalid, match=why):
            asyncio.run(rootfs.RootfsService._unpack(_chunks(data[:member_at] + tail), tmp_path / "t2", 4 << 30))
        assert not (tmp_path / "t2").exists()


def test_a_sparse_64_gib_member_is_refused_by_quota_before_it_is_written(tmp_path):
    hostile = tmp_path / "hostile.tar"
    _hostile_tar(hostile, sparse_bytes=64 << 30)
    target = tmp_path / "unpack"
    with pytest.raises(TooLarge, match=r"quota of 4096 MiB \(rootfs_max_bytes\) by member 'huge'"):
        asyncio.run(rootfs.RootfsService._unpack(_chunks(hostile.read_bytes()), target, 4 << 30))
    assert not target.exists()
    too_many = _tar({f"f{i}": b"" for i in range(300)})  # empty files count too: an inode and a block each
    with pytest.raises(TooLarge):
        asyncio.run(rootfs.RootfsService._unpack(_chunks(too_many), target, 1 << 20))
    assert not target.exists()


def test_an_oversized_tar_header_is_refused_without_being_read_whole(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        member = tarfile.TarInfo("f")
        member.pax_headers = {"comment": "x" * (1 << 20)}
        tar.addfile(member)
    with pytest.raises(Invalid, match="header"):
        asyncio.run(rootfs.RootfsService._unpack(_chunks(buf.getvalue()), tmp_path / "u", 4 << 30))
    assert not (tmp_path / "u").exists()


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
    for path in ("/no/such/dir/on/the/pclited/host", str(tree)):  # 403 (beneath no root): the tar stream then
        with pytest.raises(WireError, match="vm-000000000000") as info:
            client.attach_rootfs("vm-000000000000", path, False)
        assert info.value.status == 404


def test_the_runtimes_tar_of_a_container_rootfs_becomes_the_same_image(tmp_path):
    """What pclite-runtime sends for the OCI tests' busybox image (`tar -C ROOTFS --numeric-owner -c .` of the
    snapshot containerd unpacked) through Untar and mke2fs + debugfs: the image holds the tree as it was."""
    from tests.support.containerd import busybox_image_tar, busybox_path
    if busybox_path() is None:
        pytest.skip("busybox-static is not installed: make deps")
    with tarfile.open(busybox_image_tar(tmp_path / "image.tar")) as oci:
        index = json.load(oci.extractfile("index.json"))
        blob = lambda digest: oci.extractfile(f"blobs/sha256/{digest.split(':')[1]}").read()  # noqa: E731
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        layer = blob(manifest["layers"][0]["digest"])
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    subprocess.run(["tar", "-C", str(snapshot), "-x", "--numeric-owner"], input=layer, check=True)
    sent = subprocess.run(["tar", "-C", str(snapshot), "--numeric-owner", "-c", "."], capture_output=True,
                          check=True).stdout
    target = tmp_path / "unpack"
    received, script = asyncio.run(rootfs.RootfsService._unpack(_chunks(sent, 65536), target, 4 << 30))
    assert received == len(sent) and _host_specials(target) == []
    image = tmp_path / "rootfs.ext4"
    info = rootfs.build_image(target, image, script=script, max_bytes=4 << 30)
    expected = rootfs.build_image(snapshot, tmp_path / "direct.ext4")
    assert info["files"] == expected["files"]
    def entries(img, path):  # (mode, name) of each entry
        return sorted((line.split()[1], line.split()[-1]) for line in debugfs(img, f"ls -l {path}").splitlines()
                      if line.strip() and line.split()[-1] not in (".", ".."))
    for path in ("/bin", "/", "/etc"):
        assert entries(image, path) == entries(tmp_path / "direct.ext4", path), path
    assert debugfs(image, "cat /etc/group") == (snapshot / "etc" / "group").read_text()
