"""Failures a request can end with, each carrying the HTTP status and the
OpenAI error fields it is reported with, so every layer raises the same kind
and the HTTP layer never has to guess (nor answer 500 with a traceback)."""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class InvalidField(BadRequest):
    """A field of the right JSON shape whose value is not allowed."""

    status = 422


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class Overloaded(ApiError):
    """This device runs as many generations as it may; retry after a while."""

    status = 429
    type = "rate_limit_exceeded"


class Unavailable(ApiError):
    """No verifier can take the session now, or the device is shutting down."""

    status = 503
    type = "service_unavailable"


class UpstreamError(ApiError):
    """The verifier answered something this drafter cannot use."""

    status = 502
    type = "server_error"
