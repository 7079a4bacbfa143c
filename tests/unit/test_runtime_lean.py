"""What keeps pclite-runtime's starts cheap: the launcher `make venv` installs, JSON without the json package, and
the modules each command imports. Plus the refill priority pclited gives pool boots (service/services/priority.py)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.runtime import jsonlite, launcher
from service.services import priority


@pytest.mark.parametrize("value", [
    {"a": [1, -2.5, None, True, False, "x\u00e9\"\n\t\\"], "b": {}, "c": [], "d": {"e": {"f": [1e100, 0]}}},
    [], "plain", 0, -3, 2 ** 70, 0.1,
])
def test_jsonlite_reads_and_writes_what_json_does(value):
    for indent in (None, 2):
        assert json.loads(jsonlite.dumps(value, indent=indent)) == value
    assert jsonlite.loads(json.dumps(value)) == value
    assert jsonlite.loads(json.dumps(value, indent=4).encode()) == value
    assert jsonlite.dumps({"k": value}) == json.dumps({"k": value})


@pytest.mark.parametrize("text", ["", " ", "{", '{"a": }', "[1,]", "1 2", '"\\x"', "{'a': 1}"])
def test_jsonlite_refuses_what_json_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsonlite.loads(text)


def test_jsonlite_refuses_what_has_no_json_form():
    with pytest.raises(ValueError, match="NaN is not valid JSON"):
        jsonlite.loads("[NaN]")  # stricter than json.loads, which takes it
    with pytest.raises(ValueError):
        jsonlite.dumps(float("nan"))
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        jsonlite.dumps({1, 2})


def _modules_after(*argv: str) -> set[str]:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.argv = ['pclite-runtime', *sys.argv[2:]]\n"
            "try:\n from service.runtime.main import main; main()\n"
            "finally:\n print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-IS", "-c", code, launcher.ROOT, "--root", "/nonexistent", *argv],
                          capture_output=True, text=True, check=False)
    return set(done.stdout.split())


def test_start_and_delete_import_neither_json_nor_the_create_machinery():
    heavy = {"json", "re", "enum", "__future__", "service.runtime.commands", "service.runtime.oci",
             "service.runtime.standin", "base64"}
    for argv in (["delete", "--force", "c1"], ["start", "c1"], ["delete", "c1"]):
        loaded = _modules_after(*argv)
        assert "service.runtime.main" in loaded, argv
        assert not loaded & heavy, (argv, loaded & heavy)
    assert "service.runtime.transport" not in _modules_after("start", "c1")


def test_launcher_writes_an_isolated_runtime(tmp_path):
    path = tmp_path / "pclite-runtime"
    used, why_not = launcher.write(str(path))
    assert why_not is None  # the quick path is built wherever a C compiler is (make deps installs one)
    first = Path(f"{path}-py").read_text().splitlines()[0]
    assert first == f"#!{used} -IS" and os.access(path, os.X_OK) and path.read_bytes()[:4] == b"\x7fELF"
    env = {**os.environ, "PYTHONPATH": "/nonexistent"}  # -I: the environment does not steer it
    done = subprocess.run([str(path), "--version"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0 and "pclite-runtime version" in done.stdout, done
    assert launcher.main(["--python", "/bin/false", str(path)]) == 1
    assert launcher.main([]) == 2


def _priorities(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(not priority.can_raise_priority(), reason="needs root or CAP_SYS_NICE to renice back to 0")
def test_a_refill_is_reniced_in_every_thread_and_back_when_claimed():
    code = "import threading, time; [threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(3)]; " \
           "print('up', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "up\n"
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 4
        assert priority.set_nice(proc.pid, 10) and _priorities(proc.pid) == {10}
        assert priority.set_nice(proc.pid, 0) and _priorities(proc.pid) == {0}
    finally:
        proc.kill()
        proc.wait()
    assert priority.set_nice(proc.pid, 5)  # gone: nothing to do


def test_threads_started_after_a_renice_inherit_it():
    seen = []
    ready = threading.Event()

    def child():
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        ready.set()

    def parent():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)
        threading.Thread(target=child).start()
        ready.wait(5)

    worker = threading.Thread(target=parent)
    worker.start()
    worker.join(5)
    time.sleep(0)
    assert seen == [7]
