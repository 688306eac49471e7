"""ctypes mirrors of the Linux x86 boot protocol's ``struct setup_header`` and ``struct boot_params``.

The layouts follow arch/x86/include/uapi/asm/bootparam.h and Documentation/x86/boot.rst. Members
the loader never touches (screen_info, EDID, EDD ...) are opaque byte arrays of the right size, so
the offsets of the members it does touch stay exactly where the kernel expects them; the tests pin
every offset.
"""

from __future__ import annotations

import ctypes

# The setup header lives at this offset both in a bzImage file and inside the zero page.
SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x5372_6448  # "HdrS" read as a little-endian u32
HDRS_OFFSET = 0x202

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

# type_of_loader value for a boot loader with no assigned id (boot.rst: "0xFF = undefined").
LOADER_TYPE_UNDEFINED = 0xFF

# e820 entry types
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

E820_MAX_ENTRIES_ZEROPAGE = 128
ZERO_PAGE_SIZE = 4096


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header`` (boot protocol 2.15), packed; it starts at 0x1f1."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),            # 0x1f1
        ("root_flags", ctypes.c_uint16),            # 0x1f2
        ("syssize", ctypes.c_uint32),               # 0x1f4
        ("ram_size", ctypes.c_uint16),              # 0x1f8
        ("vid_mode", ctypes.c_uint16),              # 0x1fa
        ("root_dev", ctypes.c_uint16),              # 0x1fc
        ("boot_flag", ctypes.c_uint16),             # 0x1fe
        ("jump", ctypes.c_uint16),                  # 0x200
        ("header", ctypes.c_uint32),                # 0x202
        ("version", ctypes.c_uint16),               # 0x206
        ("realmode_swtch", ctypes.c_uint32),        # 0x208
        ("start_sys_seg", ctypes.c_uint16),         # 0x20c
        ("kernel_version", ctypes.c_uint16),        # 0x20e
        ("type_of_loader", ctypes.c_uint8),         # 0x210
        ("loadflags", ctypes.c_uint8),              # 0x211
        ("setup_move_size", ctypes.c_uint16),       # 0x212
        ("code32_start", ctypes.c_uint32),          # 0x214
        ("ramdisk_image", ctypes.c_uint32),         # 0x218
        ("ramdisk_size", ctypes.c_uint32),          # 0x21c
        ("bootsect_kludge", ctypes.c_uint32),       # 0x220
        ("heap_end_ptr", ctypes.c_uint16),          # 0x224
        ("ext_loader_ver", ctypes.c_uint8),         # 0x226
        ("ext_loader_type", ctypes.c_uint8),        # 0x227
        ("cmd_line_ptr", ctypes.c_uint32),          # 0x228
        ("initrd_addr_max", ctypes.c_uint32),       # 0x22c
        ("kernel_alignment", ctypes.c_uint32),      # 0x230
        ("relocatable_kernel", ctypes.c_uint8),     # 0x234
        ("min_alignment", ctypes.c_uint8),          # 0x235
        ("xloadflags", ctypes.c_uint16),            # 0x236
        ("cmdline_size", ctypes.c_uint32),          # 0x238
        ("hardware_subarch", ctypes.c_uint32),      # 0x23c
        ("hardware_subarch_data", ctypes.c_uint64),  # 0x240
        ("payload_offset", ctypes.c_uint32),        # 0x248
        ("payload_length", ctypes.c_uint32),        # 0x24c
        ("setup_data", ctypes.c_uint64),            # 0x250
        ("pref_address", ctypes.c_uint64),          # 0x258
        ("init_size", ctypes.c_uint32),             # 0x260
        ("handover_offset", ctypes.c_uint32),       # 0x264
        ("kernel_info_offset", ctypes.c_uint32),    # 0x268
    ]


class BootE820Entry(ctypes.LittleEndianStructure):
    """``struct boot_e820_entry``: one memory-map range handed to the kernel."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``, the 4 KiB "zero page" whose address the kernel receives in RSI."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),             # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),           # 0x040
        ("_pad2", ctypes.c_uint8 * 4),                      # 0x054
        ("tboot_addr", ctypes.c_uint64),                    # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),                # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),                # 0x070
        ("_pad3", ctypes.c_uint8 * 8),                      # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),                  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),                  # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 16),            # 0x0a0
        ("olpc_ofw_header", ctypes.c_uint8 * 16),           # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),             # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),              # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),              # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),                    # 0x0cc
        ("cc_blob_address", ctypes.c_uint32),               # 0x13c
        ("edid_info", ctypes.c_uint8 * 0x80),               # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),                # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),                     # 0x1e0
        ("scratch", ctypes.c_uint32),                       # 0x1e4
        ("e820_entries", ctypes.c_uint8),                   # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),                 # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),        # 0x1ea
        ("kbd_status", ctypes.c_uint8),                     # 0x1eb
        ("secure_boot", ctypes.c_uint8),                    # 0x1ec
        ("_pad5", ctypes.c_uint8 * 2),                      # 0x1ed
        ("sentinel", ctypes.c_uint8),                       # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),                      # 0x1f0
        ("hdr", SetupHeader),                               # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x1F1 - 0x7B)),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),       # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),                     # 0xcd0
        ("eddbuf", ctypes.c_uint8 * (6 * 82)),              # 0xd00: 6 x struct edd_info
        ("_pad9", ctypes.c_uint8 * 276),                    # 0xeec
    ]


assert ctypes.sizeof(SetupHeader) == 0x7B
assert ctypes.sizeof(BootE820Entry) == 20
assert ctypes.sizeof(BootParams) == ZERO_PAGE_SIZE


def protocol_str(version: int) -> str:
    """Boot protocol version 0x020f as "2.15"."""
    return f"{version >> 8}.{version & 0xFF:02d}"
