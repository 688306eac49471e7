"""virtio layer."""
