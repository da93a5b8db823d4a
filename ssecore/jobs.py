"""Generation jobs: the job and its status record, request validation, and the JobQueue contract.

`RedisJobQueue` (queue_redis.py) serves any number of worker processes; `MemoryJobQueue` (queue_memory.py) serves the
worker embedded in a hub on the memory backend. Nothing here imports aiohttp.web.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

import orjson

from .capabilities import Support, check_support
from .chat import ChatError as JobRequestError
from .chat import (
    check_depth,
    parse_messages,
    parse_parallel_tool_calls,
    parse_reasoning_effort,
    parse_response_format,
    parse_tool_choice,
    parse_tools,
)
from .demo import demo_tokens

__all__ = [
    "BUILTIN_QUEUE",
    "PROVIDER_NAMES",
    "TERMINAL_STATUSES",
    "Delivery",
    "GenerationRecord",
    "Job",
    "JobQueue",
    "JobRequestError",
    "Status",
    "TooManyGenerations",
    "new_generation_id",
    "parse_job_request",
]

Status = Literal["queued", "running", "done", "error", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"done", "error", "cancelled"})
# The providers a job may name (a worker may have fewer: it ends the others' jobs as unknown_provider).
PROVIDER_NAMES = frozenset({"openai", "openai-responses", "anthropic", "gemini", "demo"})
# The providers whose jobs share one queue, which every worker reads: each worker has all of them. A provider named in
# a providers file has a queue of its own, read only by the workers whose file names it.
BUILTIN_QUEUE = PROVIDER_NAMES

_MAX_STOP = 8
_MAX_STOP_LEN = 200  # characters of one stop string
_MAX_MODEL_LEN = 200
_CHAT_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort")
_JOB_FIELDS = frozenset({"provider", "model", "messages", "params", "channel", "cancel_if_unwatched_s", *_CHAT_FIELDS})
_PARAM_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "stop"})


def new_generation_id() -> str:
    return "gen_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Job:
    """One generation to run. Serialized with orjson into the job queue."""

    id: str
    provider: str
    model: str
    messages: list[dict[str, Any]]  # as the request gave them (ssecore.chat)
    channel: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    cancel_if_unwatched_s: float | None = None
    created_at: float = field(default_factory=time.time)
    owner: str | None = None  # the client that started it (see GenerationRecord.owner)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    def dumps(self) -> bytes:
        """The job without its owner, which a queue keeps beside it: workers that know no owner still read it.
        Chat fields left unset are left out, so a plain text job reads the same to a worker that predates them."""
        body = asdict(self)
        del body["owner"]
        for name in _CHAT_FIELDS:
            if body[name] is None:
                del body[name]
        return orjson.dumps(body)

    def support(self) -> Support:
        """What a capability check looks at."""
        return Support(
            self.messages,
            self.tools,
            self.tool_choice,
            self.parallel_tool_calls,
            self.response_format,
            self.reasoning_effort,
            self.temperature,
            self.top_p,
            self.stop,
            self.max_tokens,
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> Job:
        return cls(**orjson.loads(raw))


@dataclass(slots=True)
class GenerationRecord:
    """What `GET /v1/generations/{id}` shows."""

    id: str
    provider: str
    model: str
    channel: str
    status: Status = "queued"
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    usage: dict[str, int | None] | None = None
    error: dict[str, str] | None = None
    attempts: int = 0
    # The whole assistant message once the generation ended (done or cancelled), as `done.message` gave it.
    message: dict[str, Any] | None = None
    # The client that started it (`kind:subject` of its token, or its address in anonymous mode): only it, or a token
    # naming the channel exactly, may reach it. None for records written before owners were kept. Not shown.
    owner: str | None = None

    @classmethod
    def queued(cls, job: Job) -> GenerationRecord:
        return cls(job.id, job.provider, job.model, job.channel, created_at=job.created_at, owner=job.owner)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> GenerationRecord:
        """A stored record; fields a newer version added are left out, so a node mid-upgrade still reads it."""
        return cls(**{k: v for k, v in body.items() if k in _RECORD_FIELDS})

    def public(self) -> dict[str, Any]:
        body = asdict(self)
        del body["owner"]
        body["events_url"] = f"/v1/channels/{self.channel}/events"
        return body


_RECORD_FIELDS = frozenset(f.name for f in fields(GenerationRecord))


@dataclass(frozen=True, slots=True)
class Delivery:
    """A job handed to a worker. `restarted`: an earlier run of it died; its channel may hold partial output."""

    job: Job
    entry_id: str
    restarted: bool = False


class TooManyGenerations(Exception):
    """The owner already has its limit of generations queued or running; nothing was submitted."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} generations queued or running at once")


def _number(params: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise JobRequestError("invalid_params", f"params.{name} must be a number from {lo:g} to {hi:g}")
    return float(value)


def _model(model: Any, provider: str, kind: str, allowed: Collection[str] | None) -> str:
    if not isinstance(model, str) or len(model) > _MAX_MODEL_LEN or (not model and kind != "demo"):
        raise JobRequestError("invalid_model", f"model must be a non-empty string of at most {_MAX_MODEL_LEN}")
    if allowed and model not in allowed:
        raise JobRequestError("invalid_model", f"provider {provider} serves the models {', '.join(allowed)[:300]}")
    if kind == "demo":
        try:
            demo_tokens(model)
        except ValueError as e:
            raise JobRequestError("invalid_model", str(e)) from None
    return model


def parse_job_request(
    body: Any,
    *,
    providers: Mapping[str, str],
    models: Mapping[str, Collection[str]] | None = None,
    generation_id: str,
    channel_ok: Any,
    default_unwatched_s: float | None = None,
) -> Job:
    """Validate a `POST /v1/generations` body into a Job, or raise JobRequestError (a 400; nothing is queued).

    `providers` maps each provider name a job may give to its kind (see ssecore.capabilities): what that kind cannot
    serve is refused here, naming the field; `models` lists the only models some providers allow. `channel_ok(name) ->
    bool` is the hub's channel-name rule.
    """
    if not isinstance(body, dict):
        raise JobRequestError("invalid_body", "the body must be a JSON object")
    check_depth(body)
    unknown = set(body) - _JOB_FIELDS
    if unknown:
        raise JobRequestError("invalid_body", f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    provider = body.get("provider")
    if not isinstance(provider, str) or provider not in providers:
        raise JobRequestError("unknown_provider", f"provider must be one of: {', '.join(sorted(providers))}")
    kind = providers[provider]
    model = _model(body.get("model", ""), provider, kind, (models or {}).get(provider))
    messages = parse_messages(body.get("messages"))
    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body.get("tool_choice"), tools)
    params = body.get("params", {})
    if not isinstance(params, dict) or set(params) - _PARAM_FIELDS:
        raise JobRequestError("invalid_params", f"params may hold only {', '.join(sorted(_PARAM_FIELDS))}")
    max_tokens = params.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 1_000_000
    ):
        raise JobRequestError("invalid_params", "params.max_tokens must be an integer from 1 to 1000000")
    stop = params.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list)
        or len(stop) > _MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= _MAX_STOP_LEN for s in stop)
    ):
        raise JobRequestError(
            "invalid_params",
            f"params.stop must be a string or at most {_MAX_STOP} strings, each of 1 to {_MAX_STOP_LEN} characters",
        )
    channel = body.get("channel", f"gen:{generation_id}")
    if not isinstance(channel, str) or not channel_ok(channel):
        raise JobRequestError("invalid_channel", "channel names are 1-200 characters of A-Z a-z 0-9 _ . : @ -")
    unwatched = body.get("cancel_if_unwatched_s", default_unwatched_s)
    if unwatched is not None and (
        isinstance(unwatched, bool) or not isinstance(unwatched, int | float) or not 1 <= unwatched <= 86_400
    ):
        raise JobRequestError("invalid_body", "cancel_if_unwatched_s must be a number of seconds from 1 to 86400")
    job = Job(
        id=generation_id,
        provider=provider,
        model=model or "demo",
        messages=messages,
        channel=channel,
        max_tokens=max_tokens,
        temperature=_number(params, "temperature", 0, 2),
        top_p=_number(params, "top_p", 0, 1),
        stop=stop,
        cancel_if_unwatched_s=float(unwatched) if unwatched is not None else None,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parse_parallel_tool_calls(body.get("parallel_tool_calls")),
        response_format=parse_response_format(body.get("response_format")),
        reasoning_effort=parse_reasoning_effort(body.get("reasoning_effort")),
    )
    check_support(kind, provider, job.support())
    return job


class JobQueue(Protocol):
    """Where generation jobs wait for workers, and where their status lives.

    Delivery is at least once: a job is handed out again (as `restarted`) when the worker holding it stops renewing
    its claim. A job is acknowledged only after its terminal event is stored.
    """

    async def submit(self, job: Job, *, max_active: int = 0) -> GenerationRecord:
        """Record the generation as queued and enqueue it, atomically.

        With `max_active` > 0 and an owner, the job takes one of the owner's `max_active` slots, counted over every
        node and worker; none free: TooManyGenerations, and nothing is submitted. The slot is freed by `update` with a
        terminal status, however the generation ended; should that never come (the job lost), it lapses with the
        record's lifetime.
        """
        ...

    async def get(self, generation_id: str) -> GenerationRecord | None: ...

    async def begin_attempt(self, generation_id: str) -> int:
        """Count a new run of the generation, atomically; the number orders runs (the channel's Fence attempt)."""
        ...

    async def request_cancel(self, generation_id: str) -> GenerationRecord | None:
        """Flag the generation for cancellation; its worker notices within its poll interval. None if unknown."""
        ...

    async def fetch(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        """New jobs for this worker, waiting up to `block_s` for one."""
        ...

    async def claim_stale(self, consumer: str, min_idle_s: float, count: int) -> list[Delivery]:
        """Jobs whose worker stopped renewing its claim for `min_idle_s`, now held by `consumer` (restarted)."""
        ...

    async def renew(self, consumer: str, entry_ids: Sequence[str]) -> list[str]:
        """Keep the claim on running jobs fresh so no other worker takes them. Returns the ones this consumer no
        longer holds (another worker took them over): their runs must stop, without finishing or acknowledging."""
        ...

    async def release(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Hand unfinished jobs back so another worker can claim them at once (graceful shutdown)."""
        ...

    async def ack(self, entry_id: str) -> None:
        """The job is finished (its terminal event is stored): never deliver it again."""
        ...

    async def update(self, record: GenerationRecord) -> None: ...

    async def cancel_requested(self, generation_ids: Sequence[str]) -> set[str]:
        """Which of these generations have a cancel request (one round trip)."""
        ...

    async def aclose(self) -> None: ...
