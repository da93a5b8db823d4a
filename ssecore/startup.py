"""Start-up failures said in one line: what went wrong, which setting (flag and environment variable) to change, how.

The hub and the worker print these on stderr and exit with status 2, instead of a traceback that names neither.
"""

from __future__ import annotations

import errno
import socket

__all__ = ["StartupError", "listen_failure", "setting"]


class StartupError(Exception):
    """The process cannot start; the message is the whole explanation, for one line on stderr."""


def setting(env_prefix: str, name: str) -> str:
    """How a setting is given: `--metrics-port (PRODUCER_METRICS_PORT)`."""
    return f"--{name} ({env_prefix}{name.upper().replace('-', '_')})"


def listen_failure(
    e: OSError, *, host: str, port: int, host_setting: str, port_setting: str, port_hint: str = ""
) -> str | None:
    """The line for a listener that could not bind `host:port`, or None when `e` is not a failure to bind."""
    where = f"cannot listen on {host}:{port}"
    if isinstance(e, socket.gaierror):
        return f"{where}: {host!r} is not a known host name; set {host_setting} to an address of this host"
    if e.errno == errno.EADDRINUSE:
        return f"{where}: another process holds that port; set {port_setting} to a free port{port_hint}"
    if e.errno == errno.EADDRNOTAVAIL:
        return (
            f"{where}: {host} is not an address of this host; set {host_setting} to one of its addresses "
            "(0.0.0.0 for all, 127.0.0.1 for this host only)"
        )
    if e.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); set {port_setting} to 1024 or above"
    return None
