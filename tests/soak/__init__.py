"""Soak: a real redis-server, two hub nodes and two workers with compressed timings, demo generations submitted at
random moments and followed over SSE with resume, optionally with random kill -9 of nodes and workers.
`python -m tests.soak --duration S [--kills]` runs it and prints the report; `make soak` runs it for 10 minutes."""
