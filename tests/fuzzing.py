"""What the fuzz tests share (test_fuzz.py: Seldon v1, test_v2_fuzz.py: V2 on MLServer).

Each turns a protocol's own OpenAPI document into requests with schemathesis, schema-
conforming and schema-violating alike, sends them to a real service and collects what is
wrong with the answers: a 5xx, a dropped connection, or a body that is not JSON (a NaN token
included). A 4xx that says what was wrong is fine. An answer may be empty only where the
document declares that answer with no content (V2's health endpoints); a stream of
server-sent events must carry JSON in every event.

`fuzz` sends a fixed set of cases (fixed seed, no example database, no shrinking: the same
cases every run, and a failure costs no minutes of replays against a live server) and fails
once at the end, listing one request per kind of failure with the service's tracebacks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import requests
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from service import Service, strict_json

# A case -> `requests.request` keyword arguments (method, url, headers, json/data, ...)
RequestFor = Callable[[Any, str], dict[str, Any]]


def transport_kwargs(case: Any, base_url: str) -> dict[str, Any]:
    """The request exactly as schemathesis builds it."""
    return case.as_transport_kwargs(base_url=base_url)


def cases(operation: Any, **fixed: Any) -> st.SearchStrategy:
    """Positive and negative cases for `operation`; `fixed` as for schemathesis'
    `as_strategy` (e.g. path_parameters={...}: those are never generated, nor negated)."""
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE, **fixed),
        operation.as_strategy(GenerationMode.NEGATIVE, **fixed),
    )


def describe(request: requests.PreparedRequest) -> str:
    """Enough of a request to send it again."""
    body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
    kind = request.headers.get("Content-Type", "no Content-Type")
    return f"{request.method} {request.url}\n  {kind}, {len(body)} bytes: {body[:1500]!r}"


def documented_without_content(operation: Any, status: int) -> bool:
    """Whether the document declares `status` for `operation` with no body."""
    responses = operation.definition.raw.get("responses", {})
    return str(status) in responses and not responses[str(status)].get("content")


def body_problem(response: requests.Response, operation: Any) -> str | None:
    """What is wrong with the answer's body, or None: JSON, JSON events, or documented as empty."""
    content = response.content
    if not content and documented_without_content(operation, response.status_code):
        return None
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [event for event in content.decode(errors="replace").split("\n\n") if event.strip()]
        if not events:
            return "an event stream with no events"
        for event in events:
            data = [line[len("data:") :].strip() for line in event.splitlines() if line.startswith("data:")]
            try:
                strict_json("\n".join(data))
            except ValueError as exc:
                return f"an event whose data is not JSON ({type(exc).__name__}: {exc}): {event[:300]!r}"
        return None
    try:
        strict_json(content)
    except ValueError as exc:
        return f"a body that is not JSON ({type(exc).__name__}: {exc})"
    return None


def problem(case: Any, base_url: str, request_for: RequestFor = transport_kwargs) -> tuple[str, str] | None:
    """Send `case`; what is wrong with the answer (kind, details with the request), or None."""
    kwargs = request_for(case, base_url)
    try:
        response = requests.request(**kwargs, timeout=60)
    except requests.RequestException as exc:  # the connection dropped: as bad as a 500
        return f"no answer ({type(exc).__name__})", f"{str(exc)[:500]}\n  request: {kwargs['method']} {kwargs['url']}"
    request = describe(response.request)
    body = response.content[:500]
    if response.status_code >= 500:
        return f"HTTP {response.status_code}", f"{body!r}\n  request: {request}"
    wrong = body_problem(response, case.operation)
    if wrong:
        kind = f"HTTP {response.status_code} with {wrong.split(' (')[0]}"
        return kind, f"{wrong}: {body!r}\n  request: {request}"
    return None


def server_side(log: str) -> str:
    """The service's tracebacks (each 500 logs one), else the end of its log."""
    tracebacks = list(dict.fromkeys(re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+\S.*", log)))
    if tracebacks:
        return "\n\nthe service's tracebacks:\n" + "\n\n".join(t[-3000:] for t in tracebacks[:3])
    return f"\n\nservice log (end):\n{log[-3000:]}"


def fuzz(
    service: Service,
    strategy: st.SearchStrategy,
    examples: int,
    request_for: RequestFor = transport_kwargs,
    explicit: Sequence[Any] = (),
) -> int:
    """Send `examples` generated cases (and the `explicit` ones first) to `service`; fail
    listing every kind of bad answer. Returns how many cases were sent."""
    sent: list[int] = []
    failures: dict[str, list[str]] = {}  # what went wrong -> the requests it happened to
    log_start = len(service.log())

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def send(case: Any) -> None:
        sent.append(1)
        found = problem(case, service.url, request_for)
        if found:
            failures.setdefault(found[0], []).append(found[1])

    for case in explicit:
        send = example(case=case)(send)
    send()
    assert len(sent) >= examples + len(explicit), f"only {len(sent)} cases generated"
    assert service.process.poll() is None, service.log()
    report = [f"{len(seen)} x {kind}, e.g.\n  {min(seen, key=len)[:2500]}" for kind, seen in failures.items()]
    assert not failures, "\n\n".join(report) + server_side(service.log()[log_start:])
    return len(sent)
