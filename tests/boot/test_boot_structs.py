"""Offsets of the zero-page mirrors against bootparam.h and Documentation/x86/boot.rst."""

import ctypes

import pytest

from pystratovirt.boot.bootparams import BootE820Entry, BootParams, SetupHeader

# (field, offset within struct boot_params) from bootparam.h's comments
BOOT_PARAMS_OFFSETS = {
    "screen_info": 0x000, "apm_bios_info": 0x040, "tboot_addr": 0x058, "ist_info": 0x060,
    "acpi_rsdp_addr": 0x070, "hd0_info": 0x080, "hd1_info": 0x090, "sys_desc_table": 0x0A0,
    "olpc_ofw_header": 0x0B0, "ext_ramdisk_image": 0x0C0, "ext_ramdisk_size": 0x0C4,
    "ext_cmd_line_ptr": 0x0C8, "cc_blob_address": 0x13C, "edid_info": 0x140, "efi_info": 0x1C0,
    "alt_mem_k": 0x1E0, "scratch": 0x1E4, "e820_entries": 0x1E8, "eddbuf_entries": 0x1E9,
    "edd_mbr_sig_buf_entries": 0x1EA, "kbd_status": 0x1EB, "secure_boot": 0x1EC, "sentinel": 0x1EF,
    "hdr": 0x1F1, "edd_mbr_sig_buffer": 0x290, "e820_table": 0x2D0, "eddbuf": 0xD00,
}

# (field, offset in the zero page / bzImage file) from boot.rst's "The real-mode kernel header" table
SETUP_HEADER_OFFSETS = {
    "setup_sects": 0x1F1, "root_flags": 0x1F2, "syssize": 0x1F4, "ram_size": 0x1F8,
    "vid_mode": 0x1FA, "root_dev": 0x1FC, "boot_flag": 0x1FE, "jump": 0x200, "header": 0x202,
    "version": 0x206, "realmode_swtch": 0x208, "start_sys_seg": 0x20C, "kernel_version": 0x20E,
    "type_of_loader": 0x210, "loadflags": 0x211, "setup_move_size": 0x212, "code32_start": 0x214,
    "ramdisk_image": 0x218, "ramdisk_size": 0x21C, "bootsect_kludge": 0x220, "heap_end_ptr": 0x224,
    "ext_loader_ver": 0x226, "ext_loader_type": 0x227, "cmd_line_ptr": 0x228,
    "initrd_addr_max": 0x22C, "kernel_alignment": 0x230, "relocatable_kernel": 0x234,
    "min_alignment": 0x235, "xloadflags": 0x236, "cmdline_size": 0x238, "hardware_subarch": 0x23C,
    "hardware_subarch_data": 0x240, "payload_offset": 0x248, "payload_length": 0x24C,
    "setup_data": 0x250, "pref_address": 0x258, "init_size": 0x260, "handover_offset": 0x264,
    "kernel_info_offset": 0x268,
}


def test_sizes():
    assert ctypes.sizeof(BootParams) == 4096
    assert ctypes.sizeof(SetupHeader) == 0x26C - 0x1F1
    assert ctypes.sizeof(BootE820Entry) == 20


@pytest.mark.parametrize("name,offset", sorted(BOOT_PARAMS_OFFSETS.items()))
def test_boot_params_offsets(name, offset):
    assert getattr(BootParams, name).offset == offset


@pytest.mark.parametrize("name,offset", sorted(SETUP_HEADER_OFFSETS.items()))
def test_setup_header_offsets(name, offset):
    assert 0x1F1 + getattr(SetupHeader, name).offset == offset


def test_e820_table_holds_128_entries_before_pad8():
    assert BootParams.e820_table.offset + 128 * 20 == 0xCD0
    assert BootParams.eddbuf.offset + 6 * 82 == 0xEEC


def test_setting_fields_lands_at_the_right_bytes():
    p = BootParams()
    p.hdr.cmd_line_ptr = 0x11223344
    p.e820_entries = 7
    p.e820_table[1].addr = 0xAABBCCDD
    p.e820_table[1].type = 2
    raw = bytes(p)
    assert raw[0x228:0x22C] == (0x11223344).to_bytes(4, "little")
    assert raw[0x1E8] == 7
    assert raw[0x2D0 + 20:0x2D0 + 28] == (0xAABBCCDD).to_bytes(8, "little")
    assert raw[0x2D0 + 36:0x2D0 + 40] == (2).to_bytes(4, "little")
