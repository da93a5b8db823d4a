"""What hub nodes (`hub`) and generation workers (`producer`) share, importing neither.

The channel store (its contract and both implementations), the SSE codec, the job contract with its queues, presence,
the Redis connection helpers, liveness, and the settings helpers both processes' settings are built with.
"""
