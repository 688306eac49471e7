/* probe.c: owns the probe guest's start-up sequence: banner, boot facts, SMP, then the
 * command console. The order of the report is part of the serial protocol (see commands.c). */
#include "probe.h"
#include "lib.h"
#include "serial.h"
#include "virtio.h"

void probe_main(uint64_t boot_params)
{
	serial_init();
	printf("pystratovirt probe guest %s\n", PROBE_VERSION);
	/* The IDT first, so any fault from here on is reported on the console. */
	irq_init_bsp();
	bootinfo_init(boot_params);
	bootinfo_print_cmdline();
	bootinfo_print_mem();
	bootinfo_print_initrd();
	mp_init();
	mp_print();
	smp_boot();
	virtio_init();
	console_input_init();
	hvc_init();
	printf("ready\n");
	command_loop();
}
