"""Load tester for SSE hubs: `python -m loadtest SCENARIO [flags]` (see `loadtest.__main__` for the flags).

Worker processes hold the subscriber connections on raw asyncio streams and report to the parent every second; the
parent runs the scenario, samples the hub from /proc and /metrics, and writes the figures as JSON and Markdown.
"""
