"""What the HTTP server writes to the log: a malformed request as one line at debug level, and an access log that
never holds a token."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse

__all__ = ["RedactedAccessLogger", "server_logger"]

# The query parameter that may carry a token (EventSource cannot send headers): its value never reaches a log.
_TOKEN_PARAM = "access_token"
_REDACTED = "***"


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR, with a traceback, whatever the configured level: anyone who can
    connect could fill the log that way. Such a request is the client's fault and already answered 400, so its
    record becomes one line at DEBUG (dropped unless the level is debug). Errors of the server's own pass as they are.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or exc.code >= 500:
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        # The kind of fault only: the parser's message spans lines and quotes the request, token and all.
        record.msg, record.args = "malformed request from %s: %s", (remote, type(exc).__name__)
        record.exc_info = record.exc_text = record.stack_info = None
        return self._logger.isEnabledFor(logging.DEBUG)


def server_logger() -> logging.Logger:
    """The logger to give aiohttp's server (run_app's `logger`): aiohttp's own messages, malformed requests tamed."""
    logger = logging.getLogger("hub.http")
    if not any(isinstance(f, _MalformedRequests) for f in logger.filters):
        logger.addFilter(_MalformedRequests(logger))
    return logger


class RedactedAccessLogger(AbstractAccessLogger):
    """One line per request, as aiohttp's default format has it (no Referer: another site's URL, maybe with its own
    secrets), with the value of `access_token` in the query replaced by `***`."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs "%s"',
            request.remote,
            request.method,
            redacted_target(request),
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time,
            request.headers.get("User-Agent", "-"),
        )


def redacted_target(request: BaseRequest) -> str:
    """The request's path and query, with the token parameter's value masked (however its name was encoded)."""
    url = request.rel_url
    if _TOKEN_PARAM not in url.query:
        return request.raw_path
    return str(url.with_query([(k, _REDACTED if k == _TOKEN_PARAM else v) for k, v in url.query.items()]))
