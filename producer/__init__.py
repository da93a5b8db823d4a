"""Producer workers: take generation jobs, stream AI provider output token by token into hub channels."""

__version__ = "0.1.0"
