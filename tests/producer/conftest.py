"""Fixtures of the provider tests: the fake provider server, a client session, and a hub whose worker calls the fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from producer.settings import ProducerSettings
from ssecore.backend_memory import MemoryBackend
from tests.conftest import ClientFactory
from tests.producer.fake_providers import FakeProviders


@pytest.fixture
async def fake() -> AsyncIterator[FakeProviders]:
    async with FakeProviders() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def fake_hub(make_client: ClientFactory, fake: FakeProviders) -> TestClient[Any, Any]:
    """A hub with its embedded worker, every built-in provider pointed at the fake server, the demo at full speed."""
    keys = fake.provider_keys()
    return await make_client(
        MemoryBackend(history=10_000, ttl_s=3600),
        worker_settings=ProducerSettings(metrics_port=0, poll_s=0.05, demo_tokens_per_s=0),
        provider_keys=keys,
    )
