"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (what SLURM,
Kubernetes and preemptible cloud machines send before killing a job): the
current step finishes, the run saves a checkpoint and exits with
EXIT_INTERRUPTED. A second signal exits at once, without saving.

Under torchrun every rank checks, after each step, whether any rank has been
signalled (one all-reduce of a small integer), so all ranks stop after the
same step and enter the checkpoint's collectives together, even when the
signal reached only one of them. torchrun passes the signals it gets on to
its ranks (each in its own session), and a scheduler such as SLURM signals
every process of the job as well, so a rank can get one request twice: under
torchrun, the same signal again within DUPLICATE_WINDOW_S of the first
counts as the same request.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry":
# the run stopped cleanly after saving, and rerunning the command continues it.
EXIT_INTERRUPTED = 75
DUPLICATE_WINDOW_S = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager installing the handlers (main thread only; elsewhere
    it does nothing). `requested` is the first signal this process got;
    `agreed(trainer)` is the collective check the training loop makes."""

    def __init__(self, under_torchrun: bool | None = None):
        self.requested: int | None = None
        self.stopped_by: int | None = None  # the signal all ranks agreed to stop for
        self._first_at = 0.0
        self._old: dict[int, object] = {}
        self._torchrun = "TORCHELASTIC_RUN_ID" in os.environ if under_torchrun is None else under_torchrun

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                # A signal the process was started to ignore (nohup, a
                # background job's SIGINT) stays ignored, as Python leaves it.
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first_at = signum, now
            # os.write, not print: the handler may run while the main thread is inside a print
            os.write(2, f"\n{name}: finishing this step, then saving a checkpoint "
                        f"(send it again to exit at once without saving)\n".encode())
            return
        if self._torchrun and signum == self.requested and now - self._first_at < DUPLICATE_WINDOW_S:
            return
        os.write(2, f"\n{name} again: exiting now without saving\n".encode())
        os._exit(128 + signum)

    def agreed(self, trainer) -> bool:
        """Whether to stop after this step; the same answer on every rank."""
        mine = self.requested or 0
        if trainer.distributed and trainer.world > 1:
            flag = torch.tensor([mine], dtype=torch.int64, device=trainer.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            mine = int(flag.item())
        if mine:
            self.stopped_by = mine
        return bool(mine)

    @property
    def stop_name(self) -> str:
        return signal.Signals(self.stopped_by).name if self.stopped_by else ""
