"""The server process that training processes are forked from (standard library only: a stage imports it first).

The train, replay and pretrain stages train side by side in processes forked from a forkserver that has imported the
stage's training module (:func:`spinedxa.runtime.training_pool`): importing it (torch, torchvision, MLflow,
scikit-learn) takes 4-5 s of one core. Started when the pool is first needed, the server imported only after the stage
had done the same, with the other core idle. :func:`start_early`, called by the stage before its own heavy imports,
starts it first so that both import at once. Results do not depend on it: the server only imports; each training
process seeds and sets its threads itself (tests/test_train.py).

Only a stage process starts it early (``main()`` from the command line, ``argv`` None): it exits after its stage. A
caller of ``main(argv)`` in its own process (the tests) gets the server when its pool first needs one, as before, so
no server outlives the call with that call's working directory and environment.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os


def context(preload: str) -> multiprocessing.context.ForkServerContext:
    """The forkserver context whose server preloads ``preload`` (once started, a server keeps its preload)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([preload])
    return ctx


def start_early(preload: str, processes: int) -> bool:
    """Start the forkserver now, importing ``preload``, if the stage will train in ``processes`` > 1 processes.

    Not under torchrun (``WORLD_SIZE`` > 1): each rank trains in its own process there, with no pool.

    Returns:
        Whether it started the server (the pool reuses it).
    """
    if processes <= 1 or os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        return False
    context(preload)
    multiprocessing.forkserver.ensure_running()
    return True
