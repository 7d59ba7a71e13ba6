"""The one error type of the server, rendered as OpenAI's error JSON.

Clients (the ``openai`` package, lm-evaluation-harness) read ``error.message`` and the status
code, so every refusal carries both; the server never answers a bad request with a traceback.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses or could not serve, with the HTTP status to answer."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        kind: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.kind = kind or _KINDS.get(status, "invalid_request_error")
        self.code = code  # OpenAI's machine-readable reason (e.g. "model_not_found")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code or self.status,
            }
        }


def internal_error(err: Exception) -> APIError:
    """A 500 for a bug, naming the exception (the one line a client gets, no traceback)."""
    return APIError(f"internal error: {type(err).__name__}: {err}", 500)


_KINDS = {
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "server_overloaded",
}
