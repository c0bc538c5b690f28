"""Errors that carry a message meant for the user, shown as one line by the entry points."""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key (or file and row) and what is accepted."""
