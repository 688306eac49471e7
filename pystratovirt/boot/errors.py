"""The boot layer's one public exception, kept in its own module so every boot module can raise it."""


from ..errors import PyStratoVirtError


class BootError(PyStratoVirtError):
    """The kernel, initrd, command line or VM shape cannot be booted; the message is one sentence."""
