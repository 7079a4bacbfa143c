"""`make bench`: every benchmark in one session (one lab boot on hosts whose KVM cannot boot Linux)."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

for name in ("boot_peers", "boot", "agent", "claim"):
    runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
