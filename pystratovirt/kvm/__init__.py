"""kvm layer."""
