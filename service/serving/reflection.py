"""Server reflection as grpc.reflection.v1 and v1alpha, from one servicer.

grpcio-reflection (1.85) ships v1alpha only. The v1 proto is the same file under another package
name, so the two are wire-identical: v1 is the v1alpha servicer behind a second method path, and
its descriptor (a renamed copy of v1alpha's) joins the default pool so that v1 itself can be
described like every other listed service. Newer grpcurl, grpcui and Postman ask for v1 first.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

# The aio servicer, public as reflection.aio.ReflectionServicer (a re-export mypy does not see).
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor with v1's name, package and options."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old = f".{file.package}."
    new = f".{V1_PACKAGE}."
    file.name = V1_FILE
    file.package = V1_PACKAGE
    for message in file.message_type:  # v1alpha has no nested messages
        for field in message.field:
            if field.HasField("type_name"):  # set on scalars, even to "", it breaks the file
                field.type_name = field.type_name.replace(old, new, 1)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    file.options.Clear()
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.java_outer_classname = "ServerReflectionProto"
    file.options.java_multiple_files = True
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return file


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Put v1's file into the pool, once (every server of a process shares the default pool)."""
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(v1_file().SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha; both list `service_names` and themselves."""
    add_v1_descriptor(descriptor_pool.Default())
    servicer = ReflectionServicer((*service_names, *SERVICE_NAMES))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    # As generated code registers a service: the generic handler, and the registered one that
    # takes precedence over it.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),)
    )
    server.add_registered_method_handlers(V1_SERVICE_NAME, handlers)  # type: ignore[attr-defined]  # not in grpc-stubs
