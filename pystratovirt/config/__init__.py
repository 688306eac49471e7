"""Configuration parsing: StratoVirt-style command line and ``-config`` JSON -> one typed VmConfig.

Public API: :func:`parse_command_line` (argv without the program name -> :class:`Invocation`) and
:class:`ConfigError`, the only exception parsing raises; its ``str()`` is one sentence for the user.

Modules: :mod:`.args` (argv tokenizer, option table, help/version text), :mod:`.values` (sizes,
booleans, ``key=value`` lists), :mod:`.json_config` (the JSON schema), :mod:`.draft` (merging the
two sources and the final checks), :mod:`.cmdline` (what each option means). The typed result
lives in :mod:`pystratovirt.machine.vmconfig`.
"""

from .cmdline import Invocation, parse_command_line
from .errors import ConfigError

__all__ = ["ConfigError", "Invocation", "parse_command_line"]
