"""Pure boot logic: loaders (bzImage, ELF/PVH), boot_params/e820, PVH start info, page tables, GDT and MP table.

Nothing here touches /dev/kvm, runs a build or starts a process: every function works on bytes and files, so it is
unit-testable anywhere. The artifacts it boots are built by guestbuild/; the QEMU lab is pclitelab/.
"""
