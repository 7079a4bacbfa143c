"""Business logic: flavors, the VM inventory, VMM processes, pools, supervision. Routes only call in here."""
