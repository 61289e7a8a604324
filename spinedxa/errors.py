"""Errors that are the user's to fix, and the one way every stage reports them.

A bad ``params.yaml`` key, a cohort that fails validation, a missing input of an earlier stage: these are not bugs,
so a stage reports them as one clear message (file, key or expectation, and what to change) and exits with status 1,
never with a Python traceback. Bugs (anything else) keep their traceback.

Every module raises its own specific exception (``ConfigError``, ``ValidationFailed``, ``SplitError``, ...); each
of those also derives from :class:`UserError`, which is what :func:`stage_main` catches. A missing input file
(``FileNotFoundError``: an earlier stage has not run) is reported the same way.

This module imports nothing heavy: stages wrap their ``main`` with it before importing torch or MLflow.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, Sequence

log = logging.getLogger("spinedxa")


class UserError(Exception):
    """A problem with the user's params or data: reported as one message and exit status 1 (no traceback)."""


def report(exc: BaseException, stage: str) -> None:
    """Print ``exc`` as the stage's error message on stderr (one block, no traceback)."""
    text = str(exc) or type(exc).__name__
    print(f"ERROR {stage}: {text}", file=sys.stderr)


def stage_main(stage: str) -> Callable[[Callable[..., object]], Callable[..., int]]:
    """Decorate a stage's ``main(argv)``: user errors become a message and exit status 1.

    The wrapped ``main`` returns the stage's own status (0 when it returns None) and 1 after a :class:`UserError`
    or ``FileNotFoundError``; any other exception is a bug and propagates with its traceback.
    """

    def decorate(main: Callable[..., object]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: Sequence[str] | None = None) -> int:
            try:
                status = main(argv)
            except (UserError, FileNotFoundError) as exc:
                report(exc, stage)
                return 1
            return int(status or 0)

        return wrapped

    return decorate
