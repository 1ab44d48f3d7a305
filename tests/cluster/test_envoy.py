"""The front door: JSON over HTTP (curl), gRPC and CORS through Envoy to real replicas, with
the routes of the protos' google.api.http annotations."""

from __future__ import annotations

import uuid

import grpc
import pytest
from shop.v1 import user_service_pb2 as users_api
from shop.v1.user_service_pb2_grpc import UserServiceStub

from deploy.cluster import Cluster
from deploy.envoy.admin import CLUSTER
from tests import tools
from tests.cluster.curl import curl, post_json

pytestmark = pytest.mark.requires(tools.ENVOY, tools.CURL)

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
# Calls sent one after another to see them spread: with no request in flight, LEAST_REQUEST
# picks between the replicas at random, so one of two is missed 20 times running 1 in 2^19.
SPREAD_CALLS = 20


def create_user(cluster: Cluster, email: str) -> dict[str, object]:
    reply = post_json(
        f"{cluster.url}/v1/users", {"email": email, "firstName": "Ada", "lastName": "Lovelace"}
    )
    assert reply.status == 200, reply
    user: dict[str, object] = reply.json()
    return user


def requests_per_replica(cluster: Cluster) -> dict[str, int]:
    """Each upstream's rq_total as Envoy's /clusters shows it: the calls it routed there (its
    own active health checks are not counted)."""
    counts: dict[str, int] = {}
    for line in cluster.admin.get("/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "rq_total":
            counts[parts[1]] = int(parts[3])
    return counts


def test_envoy_routes_calls_to_every_replica(envoy_cluster: Cluster) -> None:
    """The fixture waits until Envoy holds every replica healthy; this checks that calls
    through the front door then reach each of them."""
    before = requests_per_replica(envoy_cluster)
    with grpc.insecure_channel(envoy_cluster.address) as channel:
        users = UserServiceStub(channel)
        for _ in range(SPREAD_CALLS):
            with pytest.raises(grpc.RpcError) as caught:
                users.GetUser(users_api.GetUserRequest(id=987654321), timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    after = requests_per_replica(envoy_cluster)
    routed = {upstream: after.get(upstream, 0) - before.get(upstream, 0) for upstream in after}
    assert sum(routed.values()) == SPREAD_CALLS, routed
    assert all(routed.get(upstream, 0) > 0 for upstream in envoy_cluster.upstreams), routed


def test_create_user_by_post_then_get_user_by_get(envoy_cluster: Cluster) -> None:
    created = create_user(envoy_cluster, "ada@example.com")
    assert created["email"] == "ada@example.com"
    assert created["isActive"] is True  # always_print_primitive_fields: false is printed too

    fetched = curl(f"{envoy_cluster.url}/v1/users/{created['id']}")

    assert fetched.status == 200
    assert fetched.headers["content-type"] == "application/json"
    assert fetched.json() == created


def test_not_found_is_404_with_the_grpc_status_and_error_info(envoy_cluster: Cluster) -> None:
    reply = curl(f"{envoy_cluster.url}/v1/users/987654321")

    assert reply.status == 404
    status = reply.json()
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert status["message"] == "user 987654321 not found"
    [info] = [d for d in status["details"] if d["@type"] == ERROR_INFO]
    assert info["reason"] == "USER_NOT_FOUND"
    assert info["metadata"] == {"id": "987654321"}


def test_invalid_argument_is_400_with_the_field_violations(envoy_cluster: Cluster) -> None:
    reply = post_json(f"{envoy_cluster.url}/v1/users", {"email": "nope", "firstName": "Ada"})

    assert reply.status == 400
    status = reply.json()
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    [bad_request] = [d for d in status["details"] if d["@type"] == BAD_REQUEST]
    fields = {v["field"] for v in bad_request["fieldViolations"]}
    assert fields == {"email", "last_name"}


def test_an_unknown_route_is_404_from_envoy(envoy_cluster: Cluster) -> None:
    reply = curl(f"{envoy_cluster.url}/v1/nothing")

    assert reply.status == 404
    assert "Could not resolve /v1/nothing to a method" in reply.body


def test_stream_users_is_newline_delimited_json_with_every_row(envoy_cluster: Cluster) -> None:
    emails = {f"export{i}@example.com" for i in range(7)}
    for email in emails:
        create_user(envoy_cluster, email)

    reply = curl(f"{envoy_cluster.url}/v1/users:stream?batchSize=3")

    assert reply.status == 200
    batches = reply.lines()
    assert [len(b["users"]) for b in batches] == [3, 3, 1]
    assert {u["email"] for b in batches for u in b["users"]} == emails
    assert all(b["resumeToken"] for b in batches)


def open_account(cluster: Cluster, user_id: object) -> dict[str, object]:
    reply = post_json(
        f"{cluster.url}/v1/accounts",
        {"userId": user_id, "currency": "EUR", "requestId": f"open-{uuid.uuid4()}"},
    )
    assert reply.status == 200, reply
    account: dict[str, object] = reply.json()
    return account


def test_transfer_by_post_is_idempotent_by_request_id(envoy_cluster: Cluster) -> None:
    user = create_user(envoy_cluster, "payer@example.com")
    payer, payee = open_account(envoy_cluster, user["id"]), open_account(envoy_cluster, user["id"])
    deposit = post_json(
        f"{envoy_cluster.url}/v1/accounts/{payer['id']}:deposit",
        {"amount": "100.00", "requestId": "deposit-1"},
    )
    assert deposit.status == 200, deposit
    transfer = {"toAccountId": payee["id"], "amount": "30.00", "requestId": "transfer-1"}
    url = f"{envoy_cluster.url}/v1/accounts/{payer['id']}:transfer"

    first, again = post_json(url, transfer), post_json(url, transfer)

    assert first.status == again.status == 200, (first, again)
    assert first.json() == again.json()
    assert first.json()["fromAccountId"] == payer["id"]
    balances = [
        curl(f"{envoy_cluster.url}/v1/accounts/{account['id']}").json()["balance"]
        for account in (payer, payee)
    ]
    assert balances == ["70.00", "30.00"]  # applied once


def test_already_exists_is_409_and_failed_precondition_is_400(envoy_cluster: Cluster) -> None:
    user = create_user(envoy_cluster, "twice@example.com")
    again = post_json(
        f"{envoy_cluster.url}/v1/users",
        {"email": "twice@example.com", "firstName": "Ada", "lastName": "Lovelace"},
    )
    assert again.status == 409
    assert again.json()["code"] == grpc.StatusCode.ALREADY_EXISTS.value[0]
    account = open_account(envoy_cluster, user["id"])
    broke = post_json(
        f"{envoy_cluster.url}/v1/accounts/{account['id']}:withdraw",
        {"amount": "1.00", "requestId": "withdraw-from-nothing"},
    )
    assert broke.status == 400
    assert broke.json()["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_grpc_through_envoy(envoy_cluster: Cluster) -> None:
    with grpc.insecure_channel(envoy_cluster.address) as channel:
        users = UserServiceStub(channel)
        created = users.CreateUser(
            users_api.CreateUserRequest(email="grpc@example.com", first_name="G", last_name="R"),
            timeout=30,
        )
        assert users.GetUser(users_api.GetUserRequest(id=created.id), timeout=30) == created
        batches = list(users.StreamUsers(users_api.StreamUsersRequest(batch_size=10), timeout=30))
        assert [u.id for b in batches for u in b.users] == [created.id]
        with pytest.raises(grpc.RpcError) as missing:
            users.GetUser(users_api.GetUserRequest(id=987654321), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "origin", ["http://127.0.0.1:5173", "http://localhost:3000", "http://[::1]:8000"]
)
def test_cors_preflight_allows_a_local_page(envoy_cluster: Cluster, origin: str) -> None:
    reply = curl(
        "-X",
        "OPTIONS",
        f"{envoy_cluster.url}/shop.v1.UserService/GetUser",
        "-H",
        f"origin: {origin}",
        "-H",
        "access-control-request-method: POST",
        "-H",
        "access-control-request-headers: content-type,x-grpc-web",
    )

    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == origin
    assert "x-grpc-web" in reply.headers["access-control-allow-headers"]
