"""qmp layer."""
