"""Shared test helpers: running the VMM as a real process and talking to its serial port and QMP."""
