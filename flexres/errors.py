"""Errors every layer may raise (the bottom of the import order, so no layer imports a higher one for them)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or option that cannot work: an unknown key, method or combination."""
