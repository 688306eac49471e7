"""pystratovirt: a StratoVirt-compatible micro-VM monitor on Linux KVM, written in Python."""

__version__ = "0.1.0"
