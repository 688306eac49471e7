"""The virtio layer: split virtqueues (queue), the device base class, interrupt and I/O thread
(device), the virtio-mmio transport (mmio), and the device models (blk, balloon, ...); driver is
a guest-side model used only by tests and benchmarks."""
