"""memory layer: guest RAM regions and their host backing, the guest physical layout,
bounds-checked access."""

from .guest import Backing, GuestMemory, GuestMemoryError, Region

__all__ = ["Backing", "GuestMemory", "GuestMemoryError", "Region"]
