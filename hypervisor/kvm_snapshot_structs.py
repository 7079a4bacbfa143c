"""KVM structs only snapshot/restore needs (irqchip, PIT, clock, XSAVE, XCRs, vCPU events, MP state, debug regs).

Kept out of ``kvm_structs`` so booting a VM does not build them (ctypes classes cost ~6 ms of VMM start-up in the
lab).
Sizes are asserted against the kernel ABI in ``tests/unit/test_kvm_bindings.py``.
"""

from __future__ import annotations

import ctypes

from hypervisor.kvm_structs import _same, _Struct, s64, u8, u16, u32, u64

KVM_MAX_XCRS = 16


class kvm_xcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class kvm_xsave(_Struct):
    """The legacy 4 KiB XSAVE area; KVM_GET_XSAVE2 may use a larger buffer (see ``Vcpu.get_xsave``)."""

    _fields_ = [("region", u32 * 1024)]


class _vcpu_events_exception(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _vcpu_events_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _vcpu_events_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _vcpu_events_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _vcpu_events_triple_fault(_Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [
        ("exception", _vcpu_events_exception),
        ("interrupt", _vcpu_events_interrupt),
        ("nmi", _vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _vcpu_events_smi),
        ("triple_fault", _vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


class kvm_debugregs(_Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_pic_state(_Struct):
    _fields_ = _same(
        u8,
        "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask init_state "
        "auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr elcr_mask",
    )


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(_Struct):
    # redirtbl entries are kept as raw 64-bit words (the C union's ``bits`` member).
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class _irqchip_union(ctypes.Union):
    _fields_ = [("dummy", u8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(_Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


class kvm_pit_channel_state(_Struct):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        *_same(u8, "count_latched status_latched status read_state write_state write_latch rw_mode mode bcd gate"),
        ("count_load_time", s64),
    ]


class kvm_pit_state2(_Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_clock_data(_Struct):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]
