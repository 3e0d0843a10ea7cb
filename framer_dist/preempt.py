"""Preemption: a signal sets a flag; the ranks agree on it each step, save together, then exit
with checkpoint.requeue_exit_code so a launcher (sbatch script, submitit) can requeue.

The handler does nothing but set a flag: saving inside a signal handler would run collectives on
one rank only and deadlock the others.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from framer_dist.config import ConfigError


class PreemptionHandler:
    """Installs handlers for `signal_name` (SIGUSR1/SIGUSR2, or 'none') and SIGTERM."""

    def __init__(self, signal_name: str = "SIGUSR1", sigterm: bool = True) -> None:
        sigs = []
        if signal_name not in ("", "none"):
            if signal_name not in ("SIGUSR1", "SIGUSR2"):
                raise ConfigError(f"config key 'checkpoint.preempt_signal': {signal_name!r} is not "
                                  "allowed; allowed values: 'SIGUSR1', 'SIGUSR2', 'none'")
            sigs.append(getattr(signal, signal_name))
        if sigterm:
            sigs.append(signal.SIGTERM)
        self.signals = sigs
        self.requested = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def from_config(cls, cfg) -> "PreemptionHandler":
        return cls(cfg.checkpoint.preempt_signal)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.received = signum

    def install(self) -> "PreemptionHandler":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self, keep_sigterm: bool = False) -> None:
        """Restore the previous handlers. ``keep_sigterm``: leave SIGTERM setting the flag, for a
        process on its way out with the requeue code after its save: the launcher's requeue
        (submitit's rank 0 runs `scontrol requeue` as soon as its own trainer exits) makes SLURM
        SIGTERM the ranks still exiting, and dying of it would read as a failure."""
        for s, prev in self._previous.items():
            if not (keep_sigterm and s == signal.SIGTERM):
                signal.signal(s, prev)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def should_stop(self, backend) -> bool:
        """Collective: True on every rank when any rank got the signal. Call once per step."""
        return backend.agree(self.requested)
