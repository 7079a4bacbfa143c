"""Guest-side artifacts and pure boot logic: loaders, boot structures, kernel/initramfs/agent builders.

Nothing here touches /dev/kvm: every function works on bytes and files, so it is unit-testable anywhere.
"""
