"""Errors every layer may raise (the bottom of the import order, so no layer imports a higher one for them)."""

from __future__ import annotations


class FlexresError(Exception):
    """A mistake the user can fix (a recipe, an option, a file, a run), with a message that says what and where.

    The CLI prints these as one line and exits 2; any other exception is a bug and keeps its traceback. Each subclass
    also derives from the built-in error it always was (ValueError, LookupError, ...), so ``except ValueError`` still
    catches it."""


class ConfigError(FlexresError, ValueError):
    """A recipe or option that cannot work: an unknown key, a wrongly typed value, an unknown method or combination."""


class UnknownNameError(ConfigError, KeyError):
    """A model, model source or method name that names nothing; the message names it and what exists. A KeyError, as
    the model registry's unknown names always were."""

    def __str__(self) -> str:  # the message as written, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class MissingFileError(FlexresError, FileNotFoundError):
    """A file or folder the user named (a run, a checkpoint) that does not exist."""


class CheckpointMismatchError(FlexresError, RuntimeError):
    """The checkpoint does not fit the model; the message says exactly what differs."""


class ParityError(FlexresError, ValueError):
    """A converted model (exported, packed or materialised) does not compute what its source computes; nothing of the
    conversion is kept."""


class UninitializedQuantizerError(FlexresError, ValueError):
    """An LQ-Nets quantizer asked to quantize in eval mode before training ever fitted its basis."""
