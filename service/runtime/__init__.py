"""pclite-runtime: an OCI runtime (the runc CLI subset containerd's runc v2 shim calls) whose containers are pclite
microVMs. Kept light on imports: containerd starts it several times per container, and each start is paid in full."""

import sys

# Bytecode caching back on under PYTHONDONTWRITEBYTECODE=1 (as hypervisor/launch.py does for the VMM): compiling
# these modules from source on every start cost ~0.5 s of each runtime command in the lab.
sys.dont_write_bytecode = False
