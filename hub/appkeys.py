"""Typed aiohttp application keys (what a handler finds in `request.app`) and the node's small mutable state."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ssecore.backend import Backend
from ssecore.jobs import JobQueue
from ssecore.presence import Presence
from ssecore.provider_file import Catalog

from .auth import Authenticator
from .fanout import Fanout
from .limits import Limits
from .metrics import HubMetrics
from .settings import HubSettings

__all__ = [
    "AUTH",
    "BACKEND",
    "LIMITS",
    "FANOUT",
    "JOBS",
    "METRICS",
    "PRESENCE",
    "PROVIDERS",
    "SETTINGS",
    "STATE",
    "NodeState",
]


@dataclass(slots=True)
class NodeState:
    draining: bool = False


SETTINGS = web.AppKey("settings", HubSettings)
BACKEND = web.AppKey("backend", Backend)
FANOUT = web.AppKey("fanout", Fanout)
METRICS = web.AppKey("metrics", HubMetrics)
STATE = web.AppKey("state", NodeState)
AUTH = web.AppKey("auth", Authenticator)
LIMITS = web.AppKey("limits", Limits)
JOBS = web.AppKey("jobs", JobQueue)
PRESENCE = web.AppKey("presence", Presence)
PROVIDERS = web.AppKey("providers", Catalog)  # the provider names jobs may give, their kinds and models
