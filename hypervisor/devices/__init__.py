"""Device models, one per file, each attached to the port-IO or MMIO bus by the VM builder."""
