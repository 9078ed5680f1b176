"""Lists of servers for clients and workers: ``--url host1,host2`` and what watches their connections.

Every server of a list shares one database and listens on the same ports, so an entry is a host
alone (``tcp://`` prefix optional). Clients and workers use one server at a time and move to the
next, wrapping, when it stops answering or drops the connection (client.py, worker.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import ConfigError

# A host with a port of its own (not a bracketed IPv6 address): every server of a list uses the same ports.
_HOST_WITH_PORT = re.compile(r"[^:\[\]]*:\d*")
_USAGE = "give host names or addresses separated by commas, e.g. --url 10.0.0.1,10.0.0.2 (MARTINET_URL the same)"


def parse(value: str | Sequence[str]) -> tuple[str, ...]:
    """The hosts of a server list: ``"h1,h2"`` or ``["h1", "h2"]``, ``tcp://`` prefixes and spaces removed.

    Raises:
        ConfigError: the list is empty, or an entry is empty, has a port or path, or is listed twice.
    """
    if isinstance(value, str):
        entries = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(entry, str) for entry in value):
        entries = list(value)
    else:
        raise ConfigError(f"the server list must be a string or a list of strings, got {value!r:.80}: {_USAGE}")
    if not any(entry.strip() for entry in entries):
        raise ConfigError(f"no server given (the server list is {value!r:.80}): {_USAGE}")
    hosts: list[str] = []
    for position, entry in enumerate(entries, 1):
        host = entry.strip().removeprefix("tcp://").rstrip("/")
        where = f"entry {position} of the server list {value!r:.200}"
        if not host:
            raise ConfigError(f"{where} is empty: remove the extra comma; {_USAGE}")
        if any(char.isspace() for char in host) or "/" in host:
            raise ConfigError(f"{where} is not a host name or address: {_USAGE}")
        if _HOST_WITH_PORT.fullmatch(host):
            raise ConfigError(
                f"{where} names a port: every server of a list listens on the same ports, given by "
                "--client-port, --worker-port and --status-port; list the hosts alone"
            )
        if host in hosts:
            raise ConfigError(f"{where} lists {host} a second time: list each server once")
        hosts.append(host)
    return tuple(hosts)
