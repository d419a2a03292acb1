"""The user-error base class: every CLI reports a `UserError` as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a flag, a path, a file's contents): one line, exit code 2, no traceback."""


class UsageError(UserError, ValueError):
    """A command-line setting or combination of settings that cannot work."""
