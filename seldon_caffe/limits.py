"""Limits a client cannot blow up: the size of a request, and of what it decodes to.

One setting bounds a request everywhere: REST bodies (413 past it), gRPC messages in both
directions, and what a compressed payload (an .npz, an image) may expand to once decoded.
`seldon-caffe serve --max-request-mb` sets it through the environment, so every process of
the service (and s2i's, via its environment file) reads the same value.
"""

from __future__ import annotations

import os

from .errors import BadRequest, ConfigError

MAX_REQUEST_BYTES_ENV = "SELDON_CAFFE_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


def max_request_bytes() -> int:
    """The request size limit in bytes: $SELDON_CAFFE_MAX_REQUEST_BYTES, else 64 MB."""
    raw = os.environ.get(MAX_REQUEST_BYTES_ENV)
    if not raw:
        return DEFAULT_MAX_REQUEST_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"${MAX_REQUEST_BYTES_ENV}={raw!r} is not a positive number of bytes")
    return value


def check_decoded_bytes(declared: int, what: str) -> None:
    """Raise BadRequest (400) when `what` would take more than the request size limit once
    decoded. Called with the size a header declares, before anything is allocated."""
    limit = max_request_bytes()
    if declared > limit:
        raise BadRequest(
            f"{what} declares {declared:,} bytes once decoded; the limit is {limit:,} bytes (${MAX_REQUEST_BYTES_ENV})"
        )
