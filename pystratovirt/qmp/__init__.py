"""qmp layer: the QMP socket server, the JSON schema and the stream framing.

Only this package knows JSON. :class:`QmpServer` accepts clients on a unix socket and turns their
commands into the typed requests of :mod:`pystratovirt.machine.requests`, which the machine
executes; results, errors and events come back as dataclasses and leave here as JSON lines.
"""

from .schema import GREETING, MAX_MESSAGE, VERSION, Command, QmpError
from .server import MAX_OUTPUT, QmpServer, QmpSocketError
from .wire import WIRE_0X, WIRE_2X, Wire, wire_of

__all__ = ["WIRE_0X", "WIRE_2X", "Wire", "wire_of", "GREETING", "MAX_MESSAGE", "MAX_OUTPUT",
           "VERSION", "Command", "QmpError", "QmpServer", "QmpSocketError"]
