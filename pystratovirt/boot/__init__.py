"""boot layer."""
