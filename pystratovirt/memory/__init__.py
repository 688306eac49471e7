"""memory layer: guest RAM regions, the guest physical layout, bounds-checked access."""

from .guest import GuestMemory, GuestMemoryError, Region

__all__ = ["GuestMemory", "GuestMemoryError", "Region"]
