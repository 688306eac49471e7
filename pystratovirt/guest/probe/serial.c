/* serial.c: owns the polled 16550 UART driver on COM1 and the console spinlock. Every wait is
 * bounded, so a UART that never reports THRE slows output down instead of hanging the probe. */
#include "serial.h"
#include "x86.h"

#define UART_RBR 0 /* read: receive buffer; write: THR */
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5

#define LSR_DR 0x01
#define LSR_THRE 0x20

/* Each LSR read is an exit to the VMM, a few microseconds at least: this bounds a stuck
 * transmitter to well under a second per byte. */
#define THRE_POLL_LIMIT 100000

static volatile uint32_t console_lock_word;

void serial_init(void)
{
	outb(COM1_PORT + UART_IER, 0x00); /* no interrupts until the console asks for them */
	outb(COM1_PORT + UART_LCR, 0x03); /* 8N1, DLAB off: the VMM's baud rate does not matter */
	/* FIFO on with a 1-byte trigger level; no clear bits, so input typed before we
	 * started is kept. */
	outb(COM1_PORT + UART_FCR, 0x01);
	outb(COM1_PORT + UART_MCR, 0x0b); /* DTR, RTS, and OUT2, which gates IRQ 4 on PCs */
}

static void putc_raw(char c)
{
	for (int i = 0; i < THRE_POLL_LIMIT; i++) {
		if (inb(COM1_PORT + UART_LSR) & LSR_THRE)
			break;
		cpu_relax();
	}
	outb(COM1_PORT + UART_RBR, (uint8_t)c);
}

void serial_putc(char c)
{
	if (c == '\n')
		putc_raw('\r');
	putc_raw(c);
}

int serial_rx_ready(void)
{
	return inb(COM1_PORT + UART_LSR) & LSR_DR;
}

int serial_getc(void)
{
	if (!serial_rx_ready())
		return -1;
	return inb(COM1_PORT + UART_RBR);
}

void serial_enable_rx_irq(void)
{
	outb(COM1_PORT + UART_IER, 0x01);
}

void console_lock(void)
{
	while (__atomic_exchange_n(&console_lock_word, 1, __ATOMIC_ACQUIRE))
		while (console_lock_word)
			cpu_relax();
}

int console_trylock(void)
{
	for (int i = 0; i < 1000000; i++) {
		if (!__atomic_exchange_n(&console_lock_word, 1, __ATOMIC_ACQUIRE))
			return 1;
		cpu_relax();
	}
	return 0;
}

void console_unlock(void)
{
	__atomic_store_n(&console_lock_word, 0, __ATOMIC_RELEASE);
}
