"""The one base class of errors a user can fix.

A ``UserError`` is raised for input the user controls: a bad params key, a corrupt shard, a
checkpoint that fails its checksum, a drop that is not a collection. The ``segpipe`` command
prints its message as one line on stderr and exits non-zero; any other exception is a bug and
keeps its traceback. Each module keeps its own subclass (``ShardError``, ``CheckpointError``, ...)
so that callers can catch what they expect, and most also derive from the builtin they replace
(``ValueError``, ``RuntimeError``), so existing ``except ValueError`` handlers keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the file, id, key or argument at fault."""


__all__ = ["UserError"]
