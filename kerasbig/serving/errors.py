"""One refusal type for both front ends: TF Serving's canonical status codes, shown as HTTP or gRPC status."""
from __future__ import annotations

from http import HTTPStatus

# TF Serving's ToHTTPStatusCode (model_servers/http_server.cc).
HTTP_STATUS = {
    "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
    "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503,
    "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request refused as TF Serving refuses it: a canonical code (`NOT_FOUND`, ...) and a message."""

    def __init__(self, code: str, message: str, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.http_status = http_status or HTTP_STATUS[code]


def invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def not_found(message: str) -> ServingError:
    return ServingError("NOT_FOUND", message)


def too_large(message: str) -> ServingError:
    """A body past a size limit: HTTP 413 rather than TF Serving's 429, which clients read as "retry later"."""
    return ServingError("RESOURCE_EXHAUSTED", message, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
