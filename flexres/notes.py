"""Notes for the person running flexres: one plain line each, printed once per process.

A note is something worth knowing that is not an error, e.g. "40 px is outside the trained range
[48, 112]: bn_policy 'interpolate' serves it with the nearest BN". They go through the ``flexres``
logger at WARNING level, so they show as a bare line in a notebook (Python's last-resort handler) and
in the CLI (which installs a plain handler), without a source location; a repeated note is dropped.
``logging.getLogger("flexres").setLevel(logging.ERROR)`` silences them.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("flexres")
_seen: set[str] = set()


def note(message: str) -> None:
    """Emit ``message`` once per process."""
    if message in _seen:
        return
    _seen.add(message)
    logger.warning(message)


def forget_notes() -> None:
    """Let every note show again (tests, or a long-running process that wants to repeat them)."""
    _seen.clear()
