"""Reflection v1 and v1alpha over a real channel, and the HTTP routes they and the descriptor set
in generated/ carry (the set Envoy's JSON transcoder loads)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from shop.v1 import (
    account_service_pb2,
    change_feed_service_pb2,
    order_service_pb2,
    user_service_pb2,
)

from service.serving.reflection import SERVICE_NAMES, V1_FILE, V1_SERVICE_NAME
from service.serving.server import SHOP_SERVICES, USER_SERVICE
from tests.process import ROOT

DESCRIPTOR_SET = ROOT / "generated" / "descriptors" / "shop_v1.binpb"
SHOP_FILES = (user_service_pb2, order_service_pb2, account_service_pb2, change_feed_service_pb2)


def messages(package: str) -> tuple[Any, Any]:
    """The request and response classes of one reflection package, from the served pool."""
    pool = descriptor_pool.Default()
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
        for name in ("ServerReflectionRequest", "ServerReflectionResponse")
    )


async def ask(channel: grpc.aio.Channel, service: str, **request: str) -> Any:
    """One request on the service's ServerReflectionInfo stream, with that package's messages."""
    request_type, response_type = messages(service.rsplit(".", 1)[0])
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    replies = [reply async for reply in call(iter([request_type(**request)]))]
    assert len(replies) == 1
    return replies[0]


def http_rule(method: descriptor_pb2.MethodDescriptorProto) -> Any:
    assert method.options.HasExtension(annotations_pb2.http), method.name
    return method.options.Extensions[annotations_pb2.http]


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_both_versions_list_every_service(channel: grpc.aio.Channel, service: str) -> None:
    reply = await ask(channel, service, list_services="")
    names = {s.name for s in reply.list_services_response.service}
    assert {*SHOP_SERVICES, "grpc.health.v1.Health", *SERVICE_NAMES} <= names


async def test_v1_serves_descriptors_with_http_routes(channel: grpc.aio.Channel) -> None:
    reply = await ask(channel, V1_SERVICE_NAME, file_containing_symbol=USER_SERVICE)
    files = {}
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[file.name] = file
    # With its imports, so a client can read the extension it is annotated with.
    assert {"google/api/annotations.proto", "google/api/http.proto"} <= files.keys()
    (service,) = files["shop/v1/user_service.proto"].service
    routes = {m.name: http_rule(m) for m in service.method}
    assert routes["GetUser"].get == "/v1/users/{id}"
    assert (routes["UpdateUser"].patch, routes["UpdateUser"].body) == (
        "/v1/users/{user.id}",
        "user",
    )


async def test_v1_describes_itself(channel: grpc.aio.Channel) -> None:
    reply = await ask(channel, V1_SERVICE_NAME, file_containing_symbol=V1_SERVICE_NAME)
    (raw,) = reply.file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert (file.name, file.package) == (V1_FILE, "grpc.reflection.v1")
    (method,) = file.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


def test_descriptor_set_routes_every_rpc() -> None:
    """`make generate` writes it; every RPC of the three services has a google.api.http rule."""
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    files = {file.name: file for file in descriptors.file}
    # --include_imports: the transcoder resolves every type from this file alone.
    assert {"google/api/http.proto", "google/protobuf/descriptor.proto"} <= files.keys()
    methods = {
        f"{file.package}.{service.name}.{method.name}": http_rule(method)
        for file in files.values()
        if file.package == "shop.v1"
        for service in file.service
        for method in service.method
    }
    served = {
        method.full_name
        for module in SHOP_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods.keys() == served
    assert len(methods) > 20
    assert all(rule.WhichOneof("pattern") for rule in methods.values())
