"""The runtime's pclited client, set up from the client config (service/clientconfig.py, as pclitectl reads it)."""

from service.clientconfig import ConfigError, resolve
from service.runtime.state import RuntimeFailure
from service.runtime.transport import Pclited


def pclited(server: str | None = None) -> Pclited:
    """server: the one the container was created on (its state keeps it), else the config's."""
    try:
        settings = resolve(server)
    except ConfigError as exc:
        raise RuntimeFailure(str(exc)) from None
    return Pclited(settings.server, settings.token)
