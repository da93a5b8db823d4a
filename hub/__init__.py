"""SSE hub: stateless aiohttp nodes that stream Redis Streams channels to EventSource clients, with exact resume."""

__version__ = "0.1.0"
