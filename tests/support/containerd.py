"""containerd for the OCI tests and bench: a private instance (its own socket, root and state under a temp dir, the
CRI plugin off), `ctr` against it, and a busybox-static OCI image built here and imported.

containerd's shims keep their sockets in /run/containerd/s and runc v2 keeps its state in /run/containerd/runc:
fine in the lab (/run is a tmpfs there). Everything runs as root.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from guestbuild.initramfs.builder import busybox_path

IMAGE = "docker.io/library/pclite-busybox:test"
APPLETS = ("sh", "uname", "true", "false", "sleep", "cat", "echo", "hostname", "id", "ls", "kill", "stty", "tty",
           "test", "mount", "env", "pwd", "head", "wc")
CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
"""


def missing_tools() -> list[str]:
    return [tool for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "mke2fs")
            if shutil.which(tool) is None]


def _blob(blobs: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, mode: int = 0o755, link: str | None = None):
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = 0, mode
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
    elif data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def busybox_image_tar(path: Path, name: str = IMAGE) -> Path:
    """An OCI image layout tarball: one uncompressed layer with busybox-static and a few applet links."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.GNU_FORMAT) as layer:
        for directory in ("bin", "dev", "proc", "sys", "tmp", "etc", "root"):
            _add(layer, directory, mode=0o1777 if directory == "tmp" else 0o755)
        _add(layer, "bin/busybox", busybox_path().read_bytes())
        for applet in APPLETS:
            _add(layer, f"bin/{applet}", link="busybox")
        _add(layer, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
             0o644)
        _add(layer, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)
    blobs: dict[str, bytes] = {}
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer_buf.getvalue())}
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(blobs, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                     **_blob(blobs, json.dumps(manifest).encode()),
                     "platform": {"architecture": "amd64", "os": "linux"},
                     "annotations": {"io.containerd.image.name": name,
                                     "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    with tarfile.open(path, "w") as out:
        _add(out, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644)
        _add(out, "index.json", json.dumps(index).encode(), 0o644)
        _add(out, "blobs", mode=0o755)
        _add(out, "blobs/sha256", mode=0o755)
        for digest, data in blobs.items():
            _add(out, f"blobs/sha256/{digest.split(':')[1]}", data, 0o644)
    return path


class Containerd:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.dir = workdir
        self.sock = str(workdir / "containerd.sock")
        self.env = {**os.environ, **(env or {})}
        self.log_path = workdir / "containerd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> Containerd:
        config = self.dir / "config.toml"
        config.write_text(CONFIG.format(root=self.dir / "root", state=self.dir / "state", sock=self.sock))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        proc = subprocess.run(["ctr", "--address", self.sock, *args], env=self.env, timeout=timeout, check=False,
                              **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {proc.returncode}:\n{proc.stdout!r}\n{proc.stderr!r}\n"
                                 f"containerd log tail:\n{self.log()[-2000:]}")
        return proc

    def import_image(self, tar: Path) -> None:
        self.ctr("images", "import", "--snapshotter", "native", str(tar))

    def stop(self) -> None:
        for task in self.ctr("tasks", "list", "-q", check=False).stdout.decode().split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            time.sleep(0.5)
            self.ctr("tasks", "delete", "-f", task, check=False)
        for container in self.ctr("containers", "list", "-q", check=False).stdout.decode().split():
            self.ctr("containers", "delete", container, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for mount in reversed(Path("/proc/mounts").read_text().splitlines()):  # snapshots the shims left mounted
            target = mount.split()[1]
            if target.startswith(str(self.dir)):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)


def ensure_cgroup_mount() -> str | None:
    """runc needs a cgroup hierarchy; the lab mounts none. Mount cgroup2 at /sys/fs/cgroup when nothing is there;
    returns what was done, or None."""
    if any(line.split()[2] in ("cgroup", "cgroup2") for line in Path("/proc/mounts").read_text().splitlines()):
        return None
    subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True, capture_output=True)
    return "mounted cgroup2 at /sys/fs/cgroup (runc needs a cgroup hierarchy)"


def runtime_binary(directory: Path) -> str:
    """The pclite-runtime `make venv` installs as .venv/bin/pclite-runtime (the C quick path in front of the lean
    Python launcher), written into directory for this checkout: the tests and the bench measure what a user gets."""
    from service.runtime import launcher
    path = directory / "pclite-runtime"
    launcher.write(str(path))
    return str(path)


def runtime_processes() -> list[int]:
    """pids of pclite-runtime processes (stand-ins included) on this host."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith((b"pclite-runtime", b"pclite-runtime-py")) or a == b"service.runtime.main"
                   for a in args[:3]):
                found.append(int(entry.name))
    return found
