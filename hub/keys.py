"""Typed application keys and the node's small mutable state."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .backend import Backend
from .fanout import Fanout
from .metrics import HubMetrics
from .settings import HubSettings

__all__ = ["BACKEND", "FANOUT", "METRICS", "SETTINGS", "STATE", "NodeState"]


@dataclass(slots=True)
class NodeState:
    draining: bool = False


SETTINGS = web.AppKey("settings", HubSettings)
BACKEND = web.AppKey("backend", Backend)
FANOUT = web.AppKey("fanout", Fanout)
METRICS = web.AppKey("metrics", HubMetrics)
STATE = web.AppKey("state", NodeState)
