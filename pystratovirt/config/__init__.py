"""Configuration parsing: StratoVirt-style command line and ``-config`` JSON -> one typed VmConfig.

Public API: :func:`parse_command_line` (argv without the program name -> :class:`Invocation`) and
:class:`ConfigError`, the only exception parsing raises; its ``str()`` is one sentence for the user.

Two dialects, one result: early StratoVirt's (0.x) command line and JSON, and StratoVirt 2.x's
command line (Kata Containers, Kuasar, hydropper); ``VmConfig.dialect`` records which.

Modules: :mod:`.args` (argv tokenizer, option table, help/version text), :mod:`.dialect` (which
dialect an argv speaks), :mod:`.values` (sizes, booleans, ``key=value`` lists),
:mod:`.json_config` (the 0.x JSON schema), :mod:`.draft` (merging the sources and the final
checks), :mod:`.common` (the options both dialects share), :mod:`.cmdline` (the entry point and
the 0.x options), :mod:`.cmdline2x` (the 2.x options). The typed result lives in
:mod:`pystratovirt.machine.vmconfig`.
"""

from .cmdline import Invocation, parse_command_line
from .errors import ConfigError

__all__ = ["ConfigError", "Invocation", "parse_command_line"]
