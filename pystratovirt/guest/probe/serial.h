/* serial.h: owns the interface of the polled 16550 UART driver on COM1 (port 0x3f8, IRQ 4)
 * and of the console lock that keeps lines from different CPUs apart. */
#ifndef SERIAL_H
#define SERIAL_H

#define COM1_PORT 0x3f8
#define COM1_IRQ 4

void serial_init(void);
/* Write one byte; '\n' goes out as "\r\n". Caller holds the console lock. */
void serial_putc(char c);
/* A received byte, or -1 when none is waiting. */
int serial_getc(void);
int serial_rx_ready(void);
/* Let the UART raise IRQ 4 when a byte arrives (IER.ERBFI). */
void serial_enable_rx_irq(void);

void console_lock(void);
/* Bounded attempt for the exception path, where the holder may be this very CPU. */
int console_trylock(void);
void console_unlock(void);

#endif
