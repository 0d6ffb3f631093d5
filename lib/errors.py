"""The project's error base: a `UserError` is bad input a user can fix (a value, a path, a file).

Stage CLIs (`lib.cli.run`) print a UserError as one line and exit 2; anything else is a bug and
keeps its traceback. Every module's own error class derives from it (and from ValueError where
callers already catch that).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix; the message names the value and what is allowed."""
