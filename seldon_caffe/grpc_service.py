"""Seldon's gRPC server for the v1 protocol's gRPC process (server.py's _run_grpc): Seldon's
servicer behind our status-code interceptor. Its own module so that processes without a gRPC
server (the supervisor, V2's) do not import grpc."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from .errors import GRPC_CODES

if TYPE_CHECKING:
    from .server import ServeOptions


def grpc_server(user: Any, metrics: Any, options: ServeOptions) -> Any:
    """Seldon's gRPC servicer behind our status-code interceptor, with the request limit
    on messages in both directions (gRPC's own default is 4 MB)."""
    from grpc_reflection.v1alpha import reflection
    from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
    from seldon_core.wrapper import SeldonModelGRPC

    grpc_options = [
        ("grpc.max_send_message_length", options.max_request_bytes),
        ("grpc.max_receive_message_length", options.max_request_bytes),
        # Several gRPC workers share the port; a single one must own it alone.
        ("grpc.so_reuseport", int(options.grpc_workers > 1)),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.grpc_threads),
        options=grpc_options,
        interceptors=[StatusInterceptor(user)],
    )
    servicer = SeldonModelGRPC(user, metrics)
    services = ("Generic", "Model", "Transformer", "OutputTransformer", "Combiner", "Router", "Seldon")
    for service in services:  # every service Seldon's own server offers
        getattr(prediction_pb2_grpc, f"add_{service}Servicer_to_server")(servicer, server)
    names = [prediction_pb2.DESCRIPTOR.services_by_name[s].full_name for s in services]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    return server


class StatusInterceptor(grpc.ServerInterceptor):
    """A failed call ends with the status code matching its HTTP status and the same
    message as over REST (gRPC's default for any exception is UNKNOWN)."""

    def __init__(self, user: Any):
        self.user = user

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        call = handler.unary_unary

        def guarded(request: Any, context: Any) -> Any:
            self.user.request_started()
            try:
                return call(request, context)
            except Exception as exc:
                error = self.user.request_error(exc)
                code = getattr(grpc.StatusCode, GRPC_CODES.get(error.status_code, "INTERNAL"))
                context.abort(code, error.message)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
