"""Errors a user can act on. The CLI prints them as one line, `repbend: error: ...`, and exits with code 2;
anything else is an internal bug and keeps its traceback.

    UserError       base class
    ConfigError     a bad setting: names the key (`train.lr: expected a number, got 'abc'`)
    TrainingError   a run that cannot start or go on (bad output directory, resume mismatch, diverged training)

`repbend.data.errors.DataError` (a bad file, row or field) is printed the same way.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; printed without a traceback."""


class ConfigError(UserError):
    """A setting that is wrong, names its key."""


class TrainingError(UserError):
    """A training run that cannot start or continue."""
