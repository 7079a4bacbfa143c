"""A logger that imports logging on first use: `logging` costs ~0.07 s of VMM start-up in the lab, and the VMM
only logs when something goes wrong."""

from __future__ import annotations


class LazyLogger:
    __slots__ = ("name", "_logger")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = None

    def __getattr__(self, attr: str):
        # Reached only for what the slots lack: debug, info, warning, exception, isEnabledFor, ...
        if self._logger is None:
            import logging
            self._logger = logging.getLogger(self.name)
        return getattr(self._logger, attr)
