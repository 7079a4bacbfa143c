"""`make run`: start pclited for the local user with a `default` flavor (pool target 2), in the foreground.

Where this host's KVM can boot Linux, pclited runs here. Where it cannot (e.g. kvm_pvm), it runs inside the lab
VM with its port forwarded to 127.0.0.1 — the token and ~/.config/pclite/config are written here on the host so
pclitectl works unchanged, and the data dir is shared into the lab so the inventory survives restarts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FLAVOR = ROOT / "deploy" / "flavors" / "default.yaml"
STARTUP_TIMEOUT_S = 180.0
LAB_RUN_DIR = "/run/pclite"  # VMM sockets: tmpfs inside the lab (Unix sockets do not belong on a 9p share)


def _say(message: str) -> None:
    print(f"make run: {message}", flush=True)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait_healthy(url: str, failed: threading.Event) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and not failed.is_set():
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"make run: pclited did not answer {url}/healthz within {STARTUP_TIMEOUT_S:.0f} s; "
                     f"see its log above")


def _apply_default_flavor(env: dict[str, str]) -> None:
    result = subprocess.run([_bin("pclitectl"), "apply", "-f", str(DEFAULT_FLAVOR)], env=env, text=True,
                            capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"make run: could not create the default flavor: {result.stderr.strip()}")
    _say(result.stdout.strip())


def main() -> int:
    import signal
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops pclited like Ctrl-C does
    from pclitelab.detect import host_kvm_status
    from service.auth import ensure_token, write_client_config
    from service.core.config import load_settings

    settings = load_settings()
    port = settings.port or 8080
    url = f"http://127.0.0.1:{port}"
    kvm_ok, reason = host_kvm_status()
    env = dict(os.environ)
    failed = threading.Event()
    if kvm_ok:
        _say(f"starting pclited at {url} (data in {settings.data_dir})")
        proc = subprocess.Popen([_bin("pclited"), "serve"], env=env)
        runner = threading.Thread(target=lambda: (proc.wait(), failed.set()), daemon=True)
    else:
        _say(f"this host's KVM cannot boot Linux ({reason.split(':')[0]}): pclited runs inside the lab, "
             f"its API forwarded to {url}")
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            token = ensure_token(settings)
        except ValueError as exc:  # a short or placeholder token: pclited would refuse it in the lab
            raise SystemExit(f"make run: {exc}") from None
        write_client_config(settings.client_config, url, token)
        lab_env = {"PCLITE_HOST": "0.0.0.0", "PCLITE_PORT": str(port), "PCLITE_TOKEN": token,
                   "PCLITE_DATA_DIR": str(settings.data_dir), "PCLITE_RUN_DIR": LAB_RUN_DIR,
                   "PCLITE_WRITE_CLIENT_CONFIG": "false"}
        os.environ.update(lab_env)  # PCLITE_* variables are passed into the lab
        env.pop("PCLITE_HOST", None)
        from pclitelab.runner import LabRequest, run_in_lab
        request = LabRequest(command=[_bin("pclited"), "serve"], workdir=ROOT, timeout_s=0,
                             forwards=[(port, port)], extra_shares=[settings.data_dir])

        def lab() -> None:
            try:
                run_in_lab(request)
            except Exception as exc:  # the lab's own failure, already described
                print(f"make run: {exc}", file=sys.stderr)
            failed.set()
        runner = threading.Thread(target=lab, daemon=True)
    runner.start()
    try:
        _wait_healthy(url, failed)
        _apply_default_flavor(env)
        _say(f"pclited is up at {url}; try: pclitectl get pools   pclitectl run default -- uname -a   (Ctrl-C stops)")
        while not failed.wait(1):
            pass
        return 1
    except KeyboardInterrupt:
        _say("stopping pclited")
        return 0
    finally:
        if kvm_ok and proc.poll() is None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
