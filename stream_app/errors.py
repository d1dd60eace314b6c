"""Errors meant for the person at the terminal: ``streamrec`` prints their message in one or two
lines (no traceback) and exits with their code. Raise them where the cause is known and the
user can fix it; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class StreamrecError(Exception):
    """A failure the user can act on; the message says what is wrong and what to do."""

    exit_code = 1


class UsageError(StreamrecError):
    """Bad usage: an invalid setting, argument or input file (exit code 2)."""

    exit_code = 2


class ServiceUnreachable(StreamrecError):
    """A broker or Redis that cannot be reached or refuses our credentials."""

    exit_code = 1
