"""Stop between steps, never inside one: a signal asks, the loop answers once the step is done and saved."""
from __future__ import annotations

import os
import signal
import sys

from nanoft.run import distributed


class StopRequest:
    """Ctrl-C (SIGINT) asks the run to stop at the end of a step; train.py then saves a checkpoint and exits
    with 130. A KeyboardInterrupt raised mid-step would land anywhere: inside the optimizer's loop over
    parameters (some updated, some not), or after the update but before the loop counts the step, and the
    checkpoint saved then would be the state of no step (a resume would apply a step twice).

    Under torchrun every rank must stop after the same step, since saving is collective (FSDP gathers, the RNG
    states are gathered): StepGuard.ok all-reduces the request with its own flags, so a request made after that
    point ends the next step instead, and costs no collective of its own. Ctrl-C in a terminal
    reaches torchrun and every worker, and torchrun passes it on, so a repeated SIGINT changes nothing here;
    Ctrl-\\ (SIGQUIT) or kill -9 stop at once, and the last checkpoint on disk stays as it is. torchrun kills its
    workers --shutdown_timeout seconds (30 by default) after passing SIGINT on: a run whose step, evaluation and
    save take longer needs a larger one, or it ends without the new checkpoint (the last one stays whole)."""

    def __init__(self, dist: distributed.Dist) -> None:
        self.dist, self.requested = dist, False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        first, self.requested = not self.requested, True
        if first and self.dist.is_master:  # os.write: a print here could re-enter one in progress
            try:
                os.write(sys.stderr.fileno(), b"\nCtrl-C: stopping at the end of this step, with a checkpoint\n")
            except OSError:  # stderr closed (a pipe's reader gone): the request stands, unannounced
                pass

    def close(self) -> None:
        signal.signal(signal.SIGINT, self._previous)
