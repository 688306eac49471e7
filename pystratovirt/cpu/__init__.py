"""cpu layer."""
