"""The one exception type the CLI shows: a readable line (what went wrong + what to do) and an exit code."""

from __future__ import annotations

EXIT_ERROR = 1  # any pclitectl error (server down, auth, not found, bad manifest, API refusal)
EXIT_USAGE = 2  # bad flags or arguments (click's own code)


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_ERROR, *, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status  # the HTTP status when the server refused


class NotFound(CliError):
    """The server answered 404 for a named object."""
