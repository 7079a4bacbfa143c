"""Build tooling for the guest artifacts: the kernel, the initramfs and the guest agent, cached by content under
~/.cache/pclite (or $PCLITE_CACHE). Runs compilers and reads Debian packages: none of it is on the VMM's path."""
