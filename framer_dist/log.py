"""The trainer's own messages: the ``framer_dist`` logger.

Records go to stdout as ``[framer_dist] <message>`` (``[framer_dist] WARNING: <message>`` from
warning up), flushed, each on a line of its own: a tqdm progress bar on the terminal is cleared
first and redrawn below (``tqdm.external_write_mode``). stdout is looked up at each record, so
a redirected or captured stdout gets them. An application that embeds the trainer can replace the
handler (``logging.getLogger("framer_dist").handlers``) or raise the level as with any logger.

Which rank logs is the caller's decision (most messages are rank 0's); nothing here talks to
other ranks.
"""

from __future__ import annotations

import logging
import sys

NAME = "framer_dist"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[{NAME}] {level}{record.getMessage()}"


class _StdoutHandler(logging.Handler):
    """stdout at emit time, through tqdm's external write mode when tqdm is loaded."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:
                with tqdm.tqdm.external_write_mode(file=sys.stdout):
                    print(line, file=sys.stdout, flush=True)
            else:
                print(line, file=sys.stdout, flush=True)
        except Exception:  # a logging failure must not end a training run
            self.handleError(record)


def get_logger(name: str = NAME) -> logging.Logger:
    """The ``framer_dist`` logger (or a child of it), with the stdout handler on first use."""
    root = logging.getLogger(NAME)
    if not root.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # one line per message, whatever the root logger does
    return logging.getLogger(name)
