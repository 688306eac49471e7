"""The one exception the configuration parsers raise.

Every problem found while turning command-line or JSON text into a ``VmConfig`` becomes a
:class:`ConfigError` whose ``str()`` is one sentence a user can act on; the CLI prints it and
exits with status 1. Parsing never lets any other exception escape.
"""

from __future__ import annotations

from ..errors import PyStratoVirtError, printable


class ConfigError(PyStratoVirtError):
    """The command line or the JSON configuration is not valid.

    User values quoted in the message may hold newlines, NULs or undecodable bytes; they are
    escaped here so that the message is always one printable line (and printing it cannot fail).
    """

    def __init__(self, message: str):
        super().__init__(printable(message))
