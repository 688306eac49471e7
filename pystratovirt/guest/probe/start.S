/* start.S: owns the probe's assembly: the 64-bit entry point, our GDT, the exception and
 * interrupt entry stubs, and the AP trampoline (real mode -> protected mode -> long mode) that
 * smp.c copies to AP_TRAMPOLINE_ADDR. */
#include "probe.h"

/* -- BSP entry: 64-bit mode, paging on, RSI = &boot_params, interrupts off ------------------- */
	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	cli
	cld
	/* Only the BSP may run this: a VMM that also set the APs running here would have them
	 * share our stack and .bss. Such an AP parks with interrupts off; INIT still reaches it,
	 * so smp.c starts it properly later. (IA32_APIC_BASE bit 8 is the BSP flag.) */
	movq %rsi, %rbx              /* boot_params, kept in a callee-saved reg */
	movl $0x1b, %ecx
	rdmsr
	testl $0x100, %eax
	jz halt_forever
	movq $bsp_stack_top, %rsp
	movq $__bss_start, %rdi
	movq $__bss_end, %rcx
	subq %rdi, %rcx
	shrq $3, %rcx                /* the linker script keeps .bss 8-byte aligned and sized */
	xorl %eax, %eax
	rep stosq
	call load_probe_gdt
	movq %rbx, %rdi
	call probe_main
	jmp halt_forever

	.text
	.globl halt_forever
halt_forever:
	cli
1:	hlt
	jmp 1b

/* Switch to our own GDT (so nothing depends on the VMM's copy at 0x500 staying intact) and
 * reload CS with a far return to the caller. */
	.globl load_probe_gdt
load_probe_gdt:
	lgdt probe_gdtr(%rip)
	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	popq %rax
	pushq $SEL_CODE64
	pushq %rax
	lretq

/* An AP arrives here from the trampoline, in long mode, without a stack. Each takes the next
 * stack slot with one atomic add. */
	.globl ap_entry64
ap_entry64:
	movl $1, %eax
	lock xaddl %eax, ap_next_slot(%rip)
	cmpl $MAX_APS, %eax
	jae halt_forever
	movl %eax, %edi
	leaq 1(%rax), %rdx
	imulq $AP_STACK_SIZE, %rdx, %rdx
	addq $ap_stacks, %rdx
	movq %rdx, %rsp
	call load_probe_gdt
	call ap_main
	jmp halt_forever

/* -- exceptions: vectors 0..31 all end in exception_handler(), which never returns --------- */
	.macro ISR_NOERR n
isr\n:
	pushq $0                     /* a dummy error code keeps struct trap_frame uniform */
	pushq $\n
	jmp exception_common
	.endm
	.macro ISR_ERR n
isr\n:
	pushq $\n
	jmp exception_common
	.endm

	ISR_NOERR 0
	ISR_NOERR 1
	ISR_NOERR 2
	ISR_NOERR 3
	ISR_NOERR 4
	ISR_NOERR 5
	ISR_NOERR 6
	ISR_NOERR 7
	ISR_ERR 8
	ISR_NOERR 9
	ISR_ERR 10
	ISR_ERR 11
	ISR_ERR 12
	ISR_ERR 13
	ISR_ERR 14
	ISR_NOERR 15
	ISR_NOERR 16
	ISR_ERR 17
	ISR_NOERR 18
	ISR_NOERR 19
	ISR_NOERR 20
	ISR_ERR 21
	ISR_NOERR 22
	ISR_NOERR 23
	ISR_NOERR 24
	ISR_NOERR 25
	ISR_NOERR 26
	ISR_NOERR 27
	ISR_NOERR 28
	ISR_ERR 29
	ISR_ERR 30
	ISR_NOERR 31

exception_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	andq $-16, %rsp
	call exception_handler
	jmp halt_forever

/* -- device interrupts: vectors VEC_TIMER..VEC_DEVICE_LAST go to irq_dispatch(vector) -------- */
	.macro IRQ_STUB v
irq\v:
	pushq $\v
	jmp irq_common
	.endm

	.irp v, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
	IRQ_STUB \v
	.endr

irq_common:
	/* The caller-saved registers; irq_dispatch() preserves the rest. After the CPU's 5-word
	 * frame, the vector and these 9 pushes, 8 more bytes align the stack for the call. */
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq 72(%rsp), %rdi
	subq $8, %rsp
	call irq_dispatch
	addq $8, %rsp
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rax
	addq $8, %rsp
	iretq

/* The LAPIC's spurious vector needs no EOI. */
	.globl spurious_stub
spurious_stub:
	iretq

	.section .rodata
	.balign 8
	.globl isr_stub_table
isr_stub_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr\n
	.endr
	.globl irq_stub_table
irq_stub_table:
	.irp v, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
	.quad irq\v
	.endr

/* -- the AP trampoline ---------------------------------------------------------------------- */
/* Kept out of the executable sections: it only ever runs from its copy at AP_TRAMPOLINE_ADDR,
 * and disassembling its 16- and 32-bit code as 64-bit would only confuse the instruction check.
 * Every absolute address in it is AP_TRAMPOLINE_ADDR + (offset in the trampoline). */
#define TRAMP(sym) (AP_TRAMPOLINE_ADDR + (sym) - ap_trampoline_start)

	.section .rodata.trampoline, "a"
	.balign 16
	.globl ap_trampoline_start
ap_trampoline_start:
	.code16
	/* The SIPI starts us at CS = vector << 8, IP = 0, in real mode. */
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tramp_gdtr - ap_trampoline_start   /* DS-relative; a 32-bit base */
	movl %cr0, %eax
	orl $1, %eax                              /* PE */
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $TRAMP(tramp_pm32)

	.code32
tramp_pm32:
	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl %cr4, %eax
	orl $0x20, %eax                           /* PAE */
	movl %eax, %cr4
	movl TRAMP(ap_tramp_cr3), %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx                    /* EFER: the BSP's value, with LME */
	movl TRAMP(ap_tramp_efer_lo), %eax
	movl TRAMP(ap_tramp_efer_hi), %edx
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000000, %eax                     /* PG: long mode becomes active */
	movl %eax, %cr0
	ljmpl $SEL_CODE64, $TRAMP(tramp_lm64)

	.code64
tramp_lm64:
	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movq tramp_entry(%rip), %rax
	jmpq *%rax

	.balign 8
tramp_gdt:
	.quad 0
	.quad 0x00cf9b000000ffff                  /* 0x08: 32-bit code */
	.quad 0x00af9b000000ffff                  /* 0x10: 64-bit code */
	.quad 0x00cf93000000ffff                  /* 0x18: data */
tramp_gdt_end:
	.balign 8
tramp_gdtr:
	.word tramp_gdt_end - tramp_gdt - 1
	.long TRAMP(tramp_gdt)
	.balign 8
	.globl ap_tramp_cr3, ap_tramp_efer_lo, ap_tramp_efer_hi
ap_tramp_cr3:
	.long 0
ap_tramp_efer_lo:
	.long 0
ap_tramp_efer_hi:
	.long 0
	.balign 8
tramp_entry:
	.quad ap_entry64
	.globl ap_trampoline_end
ap_trampoline_end:

/* -- data ------------------------------------------------------------------------------------ */
	.data
	.balign 16
/* The same layout as the trampoline's GDT; accessed bits preset so the CPU never writes it. */
probe_gdt:
	.quad 0
	.quad 0x00cf9b000000ffff
	.quad 0x00af9b000000ffff
	.quad 0x00cf93000000ffff
probe_gdt_end:
	.balign 8
	.word 0, 0, 0                             /* puts the 8-byte base of probe_gdtr aligned */
probe_gdtr:
	.word probe_gdt_end - probe_gdt - 1
	.quad probe_gdt
	.balign 4
ap_next_slot:
	.long 0

/* Stacks are not part of .bss: nothing needs them zeroed, and clearing half a megabyte would
 * cost the emulator real time. */
	.section .stack, "aw", @nobits
	.balign 16
bsp_stack:
	.skip BSP_STACK_SIZE
bsp_stack_top:
	.globl ap_stacks
ap_stacks:
	.skip AP_STACK_SIZE * MAX_APS

	.section .note.GNU-stack, "", @progbits
