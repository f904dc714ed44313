"""The errors the package raises, each carrying the HTTP status a request gets for it.

Only `model.py` turns these into Seldon's exception; everything else raises these, so the
runtimes, the hooks machinery and the Caffe format stay free of Seldon.
"""

from __future__ import annotations

# HTTP status -> the gRPC status code a client sees for it, over both protocols (DESIGN.md, "Errors")
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class SeldonCaffeError(Exception):
    """Base class: a message meant for the user, and the HTTP status it maps to."""

    status: int = 500
    reason: str = "MICROSERVICE_INTERNAL_ERROR"


class BadRequest(SeldonCaffeError):
    """The request cannot be taken (shape, dtype, name, undecodable bytes...): HTTP 400.

    Hooks raise it too, to reject a payload with a message the client can act on.
    """

    status = 400
    reason = "MICROSERVICE_BAD_DATA"


class HookError(SeldonCaffeError):
    """A user hook raised: HTTP 500 naming the hook and the exception."""

    status = 500
    reason = "HOOK_ERROR"


class ModelUnavailable(SeldonCaffeError):
    """The model cannot answer right now (a worker died and is being restarted): HTTP 503."""

    status = 503
    reason = "MODEL_UNAVAILABLE"


class DeadlineExceeded(SeldonCaffeError):
    """The model did not answer in time (a hung pycaffe worker, past options.timeout_s): HTTP 504."""

    status = 504
    reason = "MODEL_TIMEOUT"


class Unsupported(SeldonCaffeError):
    """The runtime cannot do this operation (e.g. set_weights on a compiled engine)."""

    status = 500
    reason = "UNSUPPORTED"


class ModelLoadError(SeldonCaffeError):
    """The model directory cannot be loaded: start-up stops with this one message."""


class ConfigError(ModelLoadError):
    """model.yaml is wrong: the message names the file, the field and what is allowed."""


def first_line(exc: BaseException, limit: int = 500, last: bool = False) -> str:
    """One line of an exception's message for a one-line error: the first non-blank line (the
    `last` for engines that put the point at the end, e.g. OpenCV), cut to `limit` characters;
    "" when the message is empty (callers add the type's name)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return (lines[-1] if last else lines[0])[:limit]
