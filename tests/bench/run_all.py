"""`make bench`: every benchmark in one session (one lab boot on hosts whose KVM cannot boot Linux)."""

import runpy
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

failed = []
for name in ("boot_peers", "boot", "agent", "claim", "clone", "containers"):
    try:
        runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
    except SystemExit as exc:  # a bench that ends with sys.exit(code) must not end the others
        if exc.code:
            failed.append(name)
    except Exception:  # noqa: BLE001 - nor one that fails outright: its traceback, then the next bench
        traceback.print_exc()
        failed.append(name)
    print(flush=True)
sys.exit(f"benchmarks that failed: {', '.join(failed)}" if failed else 0)
