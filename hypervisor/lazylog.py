"""A logger that imports logging on first use: `logging` costs ~0.07 s of VMM start-up in the lab, and the VMM
only logs when something goes wrong.

Rate-limited: a guest can provoke the same device error at any rate, forever, and every line lands in vmm.log. Each
message template gets BURST lines per WINDOW_S seconds; what is held back is counted and reported in one line when
the template next logs after its window. Keep the variable parts in the arguments (`log.warning("x %s", y)`), so a
template is one key.
"""

from __future__ import annotations

import time

BURST = 10
WINDOW_S = 60.0
MAX_KEYS = 512
_LOGGERS: list = []  # every LazyLogger, for reset_rate_limits()


def reset_rate_limits() -> None:
    """Forget what each logger has logged (tests: each starts with a full burst)."""
    for logger in _LOGGERS:
        logger._windows.clear()


class LazyLogger:
    __slots__ = ("name", "_logger", "_windows")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = None
        self._windows: dict = {}  # template -> [window start, lines in it, lines held back]
        _LOGGERS.append(self)

    def __getattr__(self, attr: str):
        # Reached only for what the slots and methods lack: debug, isEnabledFor, ...
        if self._logger is None:
            import logging
            self._logger = logging.getLogger(self.name)
        return getattr(self._logger, attr)

    def _limited(self, level: str, msg: str, args: tuple, kwargs: dict) -> None:
        now = time.monotonic()
        window = self._windows.get(msg)
        if window is None or now - window[0] >= WINDOW_S:
            if len(self._windows) >= MAX_KEYS:
                self._windows.clear()
            held = window[2] if window else 0
            self._windows[msg] = window = [now, 0, 0]
            if held:
                self.__getattr__("warning")("%d more lines like %r were held back (at most %d per %d s)",
                                            held, msg, BURST, WINDOW_S)
        window[1] += 1
        if window[1] > BURST:
            window[2] += 1
            return
        kwargs.setdefault("stacklevel", 3)
        self.__getattr__(level)(msg, *args, **kwargs)

    def info(self, msg: str, *args, **kwargs) -> None:
        self._limited("info", msg, args, kwargs)

    def warning(self, msg: str, *args, **kwargs) -> None:
        self._limited("warning", msg, args, kwargs)

    def error(self, msg: str, *args, **kwargs) -> None:
        self._limited("error", msg, args, kwargs)

    def exception(self, msg: str, *args, **kwargs) -> None:
        self._limited("exception", msg, args, kwargs)
