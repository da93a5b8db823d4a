"""Every Redis key and shard channel name the hub and its workers use, in one place.

All begin with the deployment's `--key-prefix`. A channel's keys share its hash tag (`{<channel>}`), so each script
that touches them stays in one cluster slot; a generation's record and a client's slots have their own tags.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RedisKeys"]


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str
    db: int = 0  # the database, which ring channels carry (see `ring`)

    # -- a channel ----------------------------------------------------------------------------------------------------

    def stream(self, channel: str) -> str:
        """The channel's stream: its events, one entry each."""
        return f"{self.prefix}ch:{{{channel}}}"

    def channel_of(self, stream: str) -> str:
        """The channel of a stream key (the inverse of `stream`)."""
        return stream[len(self.prefix) + 4 : -1]

    def fence(self, channel: str) -> str:
        """The run of a generation allowed to write the channel (see backend.Fence)."""
        return f"{self.prefix}fence:{{{channel}}}"

    def owner(self, channel: str) -> str:
        """The client a generation's channel belongs to (see Backend.reserve)."""
        return f"{self.prefix}owner:{{{channel}}}"

    def idempotency(self, channel: str, key: str) -> str:
        """A publisher's Idempotency-Key on the channel, and the ids it was answered."""
        return f"{self.prefix}idem:{{{channel}}}:{key}"

    def ring(self, stream: str) -> str:
        """The shard channel that a stream's appends and deletion ring (see scripts/append.lua).

        Pub/sub channels are server-wide, not per database: hubs on two databases of one Redis with one key prefix
        would hear each other's rings. So the ring carries the database number, after the stream key (its hash tag,
        and so its cluster slot, unchanged). Database 0, the only one on a cluster, keeps the bare stream key, so
        nodes of different versions on it still hear each other. Stream keys end in `}` and suffixed names in a
        digit: no ring of one database can be named like one of another.
        """
        return stream + self.ring_suffix

    @property
    def ring_suffix(self) -> str:
        """What `ring` adds to a stream key (the scripts take it as an argument)."""
        return f":{self.db}" if self.db else ""

    def stream_of_ring(self, ring: str) -> str | None:
        """The stream key a ring channel belongs to (the inverse of `ring`); None if it is not one of ours."""
        suffix = self.ring_suffix
        if not suffix:
            return ring
        return ring[: -len(suffix)] if ring.endswith(suffix) else None

    # -- generations --------------------------------------------------------------------------------------------------

    @property
    def jobs(self) -> str:
        """The job stream of the built-in providers, read by every worker's consumer group."""
        return f"{self.prefix}jobs"

    def provider_jobs(self, provider: str) -> str:
        """The job stream of a provider named in a providers file, read only by the workers that have it. Tagged with
        the shared stream's name, so that on a cluster one blocking read covers them all (one slot)."""
        return f"{{{self.prefix}jobs}}:{provider}"

    def record(self, generation_id: str) -> str:
        """A generation's record (a hash: its status, attempts, owner, cancel flag)."""
        return f"{self.prefix}gen:{{{generation_id}}}"

    def active(self, owner: str) -> str:
        """A client's running generations (a sorted set, for --max-generations-per-client)."""
        return f"{self.prefix}active:{{{owner}}}"

    # -- presence -----------------------------------------------------------------------------------------------------

    @property
    def watched(self) -> str:
        """When each channel last had a subscriber on any node (a sorted set)."""
        return f"{self.prefix}watched"
