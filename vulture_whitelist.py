# What vulture (make lint: `vulture ssecore hub producer loadtest vulture_whitelist.py`) takes for unused, and why it
# is not. Each name is used by something vulture does not follow.
# ruff: noqa
# mypy: ignore-errors
_ = object()

# aiohttp route handlers: registered by their RouteTableDef decorators, called by the router.
channel_info
channel_delete
create_generation
get_generation
cancel_generation
chat_completions
create_response
get_response
cancel_response
chat
resume
stop
openapi
index

# asyncio.Protocol callbacks, called by the event loop.
_.connection_made
_.data_received
_.eof_received

# logging.LogRecord fields, set on a record the log formatter reads (hub/httplog.py).
_.levelname
_.levelno
_.msg
_.exc_text
_.stack_info

# A generation record's field: written by the worker, serialized into the record that GET /v1/generations/{id}
# answers (ssecore/jobs.py, GenerationRecord.public).
_.finished_at
finished_at

# The live tail's introspection, read by tests/hub/test_nodes.py: a node that tails nothing holds nothing.
_.subscribed
_.buffered_chars
