"""Stop between steps, never inside one: a signal asks, the loop answers once the step is done and saved."""
from __future__ import annotations

import os
import signal
import sys

from nanoft.run import distributed

# the signals that ask a run to stop, and how the message names them: Ctrl-C, and the SIGTERM with which Slurm,
# Kubernetes, docker stop, systemd and preemptible cloud machines end a job (SIGKILL follows after a grace period)
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the end of a step; train.py then saves a checkpoint and
    exits as a process ended by that signal reports it, 128 + its number (130, 143). A KeyboardInterrupt raised
    mid-step would land anywhere: inside the optimizer's loop over parameters (some updated, some not), or after
    the update but before the loop counts the step, and the checkpoint saved then would be the state of no step (a
    resume would apply a step twice); an unhandled SIGTERM ends the process with no checkpoint at all.

    Under torchrun every rank must stop after the same step, since saving is collective (FSDP gathers, the RNG
    states are gathered): StepGuard.ok all-reduces the request with its own flags, so a request made after that
    point ends the next step instead, and costs no collective of its own. Ctrl-C in a terminal reaches torchrun and
    every worker, and torchrun passes SIGINT and SIGTERM on to its workers, so a repeated signal changes nothing
    here; Ctrl-\\ (SIGQUIT) or kill -9 stop at once, and the last checkpoint on disk stays as it is. torchrun kills
    its workers --shutdown_timeout seconds (30 by default) after passing a signal on, and a scheduler sends SIGKILL
    after its own grace period: a run whose step, evaluation and save take longer ends without the new checkpoint
    (the last one stays whole)."""

    def __init__(self, dist: distributed.Dist) -> None:
        self.dist, self.requested, self.signum = dist, False, None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested, self.signum = True, signum
        if self.dist.is_master:  # os.write: a print here could re-enter one in progress
            try:
                os.write(sys.stderr.fileno(),
                         f"\n{STOP_SIGNALS[signum]}: stopping at the end of this step, with a checkpoint\n".encode())
            except OSError:  # stderr closed (a pipe's reader gone): the request stands, unannounced
                pass

    @property
    def exit_code(self) -> int:
        """128 + the signal's number; a rank that stops because another was asked reports Ctrl-C's 130."""
        return 128 + (self.signum or signal.SIGINT)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
