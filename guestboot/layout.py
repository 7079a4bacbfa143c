"""Guest-physical memory layout shared by the loaders and the VMM (x86_64, no firmware)."""

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

GDT_ADDR = 0x500             # boot GDT: null, code64, data, tss
IDT_ADDR = 0x520             # empty IDT (interrupts stay off until the kernel sets its own)
PVH_START_INFO_ADDR = 0x6000  # hvm_start_info, then its memmap right after
ZERO_PAGE_ADDR = 0x7000      # Linux boot_params ("zero page")
PML4_ADDR = 0x9000           # identity page tables: PML4, one PDPT, four PDs of 2 MiB pages (first 4 GiB)
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000             # four consecutive pages 0xB000..0xEFFF
BOOT_STACK_TOP = 0x8FF0      # only used by the 64-bit entry until the kernel switches stacks
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 2048           # COMMAND_LINE_SIZE on x86 for 6.1, including the NUL
EBDA_START = 0x9FC00         # MP table lives here; [EBDA_START, 1 MiB) is reserved in the e820
MPTABLE_ADDR = EBDA_START
HIMEM_START = 0x100000       # 1 MiB
LOW_RAM_END_MAX = 0xC0000000  # RAM below 4 GiB stops at 3 GiB; [3 GiB, 4 GiB) is the MMIO hole
MMIO_HOLE_START = LOW_RAM_END_MAX
MMIO_HOLE_END = 4 * GIB
BOOT_TIMER_ADDR = 0xC0000000  # Firecracker-compatible boot timer: the init writes byte 123 here
BOOT_TIMER_VALUE = 123
VIRTIO_MMIO_BASE = 0xD0000000  # virtio-mmio slots, VIRTIO_MMIO_SIZE apart, IRQs from VIRTIO_IRQ_BASE
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_IRQ_BASE = 5
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000

E820_RAM = 1
E820_RESERVED = 2


def ram_regions(mem_bytes: int) -> list[tuple[int, int]]:
    """(guest physical address, size) of each RAM region: below the MMIO hole, then the rest above 4 GiB."""
    low = min(mem_bytes, LOW_RAM_END_MAX)
    regions = [(0, low)]
    if mem_bytes > low:
        regions.append((MMIO_HOLE_END, mem_bytes - low))
    return regions
