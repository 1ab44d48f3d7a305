"""Every RPC over JSON/HTTP through Envoy, by curl, on the route of its google.api.http rule.

One test per service calls all of that service's RPCs on their HTTP routes and checks what
comes back. Each curl call carries its own `x-request-id`, which Envoy passes on and the replica
writes in its access line with the gRPC method it served, so the test reads which RPC every
call reached. It ends by asserting that the RPCs reached are exactly the service's methods in
the descriptor set Envoy loads: an RPC added without an HTTP test fails here. The static tests
check that every service of the descriptor has such a test, and that the route table of
docs/http-and-browser.md is the descriptor's.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from deploy.cluster import Cluster
from deploy.envoy.config import DESCRIPTOR
from tests import tools
from tests.cluster.curl import Reply, curl, logs_of

pytestmark = pytest.mark.requires(tools.ENVOY, tools.CURL)

ROUTE_TABLE_DOC = Path(__file__).resolve().parents[2] / "docs" / "http-and-browser.md"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


@dataclass(frozen=True)
class Route:
    verb: str  # GET, POST, PATCH, DELETE
    template: str  # /v1/users/{user.id}

    def matches(self, verb: str, path: str) -> bool:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(self.template))
        return verb == self.verb and re.fullmatch(pattern, path) is not None


@cache
def descriptor_routes() -> dict[str, Route]:
    """gRPC path (/shop.v1.UserService/GetUser) -> its google.api.http route, for every method
    of every shop service in the descriptor set Envoy's transcoder loads."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes()).file
    routes = {}
    for file in files:
        if not file.package.startswith("shop."):
            continue
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                kind = rule.WhichOneof("pattern")
                assert kind in {"get", "post", "patch", "delete", "put"}, (method.name, kind)
                routes[f"/{file.package}.{service.name}/{method.name}"] = Route(
                    kind.upper(), getattr(rule, kind)
                )
    return routes


def methods_of(service: str) -> set[str]:
    return {path for path in descriptor_routes() if path.startswith(f"/{service}/")}


# The service each test below covers, filled as the module is imported (not as tests run).
COVERED: dict[str, str] = {}


def covers(service: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(test: Callable[..., None]) -> Callable[..., None]:
        COVERED[service] = test.__name__
        return test

    return register


@dataclass
class Call:
    verb: str
    path: str
    request_id: str


@dataclass
class Api:
    """curl through Envoy as a shell would send it, one x-request-id per call."""

    cluster: Cluster
    calls: list[Call] = field(default_factory=list)

    def send(
        self, verb: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> Reply:
        request_id = f"http-routes-{uuid.uuid4().hex}"
        self.calls.append(Call(verb, path, request_id))
        url = f"{self.cluster.url}{path}" + (f"?{urlencode(query)}" if query else "")
        args = ["-X", verb, url, "-H", f"x-request-id: {request_id}"]
        if body is not None:
            args += ["-H", "content-type: application/json", "-d", json.dumps(body)]
        return curl(*args)

    def get(self, path: str, **query: Any) -> Reply:
        return self.send("GET", path, query=query)

    def post(self, path: str, body: Any) -> Reply:
        return self.send("POST", path, body)

    @staticmethod
    def ok(reply: Reply) -> Any:
        """The JSON body of a 200 answer."""
        assert reply.status == 200, reply
        assert reply.headers["content-type"] == "application/json", reply
        return reply.json()

    @staticmethod
    def ok_lines(reply: Reply) -> list[Any]:
        """The messages of a 200 export, one JSON object per line."""
        assert reply.status == 200, reply
        assert reply.headers["content-type"] == "application/json", reply
        return reply.lines()

    @contextmanager
    def watch(self, path: str, query: list[tuple[str, str]]) -> Iterator[Iterator[Any]]:
        """A GET that never ends on its own (WatchChanges): the JSON messages of its
        newline-delimited body as curl receives them (-N, no buffering), read as they come; curl
        is stopped on leaving. `query` is a list of pairs, so a repeated field repeats its name.
        curl's --max-time ends a stream that stays silent, so a missing line fails the test."""
        request_id = f"http-routes-{uuid.uuid4().hex}"
        self.calls.append(Call("GET", path, request_id))
        url = f"{self.cluster.url}{path}?{urlencode(query)}"
        args = ["-sS", "-i", "-N", "--max-time", "60", url, "-H", f"x-request-id: {request_id}"]
        with subprocess.Popen(
            [tools.require(tools.CURL), *args], stdout=subprocess.PIPE, text=True
        ) as process:
            assert process.stdout is not None
            stdout = process.stdout
            try:
                head = list(iter(lambda: stdout.readline().rstrip("\r\n"), ""))
                assert head and head[0].split()[1] == "200", (head, logs_of(self.cluster))
                assert "content-type: application/json" in (h.lower() for h in head), head

                def messages() -> Iterator[Any]:
                    for line in stdout:
                        if line.strip():
                            yield json.loads(line)
                    raise AssertionError(f"the watch ended\n{logs_of(self.cluster)}")

                yield messages()
            finally:
                process.terminate()

    def reached(self) -> dict[str, str]:
        """request id -> the gRPC path the replica served for it, from the replicas' access
        lines (`service.access [<request id>]: /shop.v1.UserService/GetUser OK ...`)."""
        wanted = {call.request_id for call in self.calls}
        line = re.compile(r"service\.access \[(http-routes-[0-9a-f]+)\]: (/\S+) ")
        folder = Path(self.cluster.config).parent
        deadline = time.monotonic() + 10
        while True:
            found = {
                request_id: grpc_path
                for log in folder.glob("replica-*.log")
                for request_id, grpc_path in line.findall(log.read_text())
                if request_id in wanted
            }
            if set(found) == wanted or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def assert_reached_every_rpc_of(self, service: str) -> None:
        """Each call reached the RPC whose google.api.http route it used, and the calls
        together reached every method the descriptor gives the service."""
        reached = self.reached()
        routes = descriptor_routes()
        unreached = [c for c in self.calls if c.request_id not in reached]
        assert not unreached, f"{unreached} reached no replica\n{logs_of(self.cluster)}"
        for call in self.calls:
            grpc_path = reached[call.request_id]
            assert routes[grpc_path].matches(call.verb, call.path), (call, grpc_path)
        served = {reached[c.request_id] for c in self.calls}
        assert {p for p in served if p.startswith(f"/{service}/")} == methods_of(service)


def tag() -> str:
    """A name no other test uses (tables are emptied between tests, but be plain about it)."""
    return f"h{uuid.uuid4().hex[:8]}"


# --- the static checks ---------------------------------------------------------------------


def test_every_service_of_the_descriptor_has_an_http_test() -> None:
    services = {path.split("/")[1] for path in descriptor_routes()}
    assert services == {
        "shop.v1.UserService",
        "shop.v1.OrderService",
        "shop.v1.AccountService",
        "shop.v1.ChangeFeedService",
    }
    assert set(COVERED) == services, COVERED
    assert len(descriptor_routes()) == 23


def test_the_docs_route_table_is_the_descriptors() -> None:
    row = re.compile(r"^\| (\w+)\.(\w+) \| `(GET|POST|PATCH|DELETE|PUT) (\S+)`", re.MULTILINE)
    table = {
        f"/shop.v1.{service}/{method}": Route(verb, template)
        for service, method, verb, template in row.findall(ROUTE_TABLE_DOC.read_text())
    }
    assert table == descriptor_routes()


# --- UserService ---------------------------------------------------------------------------


@covers("shop.v1.UserService")
def test_user_service_over_http(envoy_cluster: Cluster) -> None:
    api = Api(envoy_cluster)
    name = tag()

    # CreateUser: POST /v1/users, the whole request as the body.
    ada = api.ok(
        api.post(
            "/v1/users",
            {"email": f"ada.{name}@example.com", "firstName": name, "lastName": "Lovelace"},
        )
    )
    assert ada["email"] == f"ada.{name}@example.com"
    assert ada["fullName"] == f"{name} Lovelace"
    assert ada["isActive"] is True
    assert "deletedAt" not in ada

    # GetUser: GET /v1/users/{id}.
    assert api.ok(api.get(f"/v1/users/{ada['id']}")) == ada

    # UpdateUser: PATCH /v1/users/{user.id}, the body is the user, update_mask in the query:
    # firstName is sent but not in the mask, so it stays.
    updated = api.ok(
        api.send(
            "PATCH",
            f"/v1/users/{ada['id']}",
            {"firstName": "ignored", "lastName": "King"},
            query={"update_mask": "lastName"},
        )
    )
    assert (updated["firstName"], updated["lastName"]) == (name, "King")
    assert updated["fullName"] == f"{name} King"
    assert updated["updatedAt"] > ada["updatedAt"]

    # UpsertUsers: POST /v1/users:batchUpsert, one new user and one update.
    upserted = api.ok(
        api.post(
            "/v1/users:batchUpsert",
            {
                "users": [
                    {"email": f"alan.{name}@example.com", "firstName": name, "lastName": "Turing"},
                    {"email": ada["email"], "firstName": name, "lastName": "Byron"},
                ]
            },
        )
    )
    assert upserted == {"inserted": "1", "updated": "1"}

    # ImportUsers (client stream): the body is a JSON array, one ImportUsersRequest per
    # message of the stream; the transcoder sends them as one stream and answers at its end.
    imported = api.ok(
        api.post(
            "/v1/users:import",
            [
                {
                    "users": [
                        {"email": f"grace.{name}@example.com", "firstName": name, "lastName": "H"},
                        {"email": f"edsger.{name}@example.com", "firstName": name, "lastName": "D"},
                    ]
                },
                {
                    "users": [
                        {"email": f"barbara.{name}@example.com", "firstName": name, "lastName": "L"}
                    ]
                },
            ],
        )
    )
    assert imported == {"imported": "3"}

    # DeleteUser: DELETE /v1/users/{id} (soft: deletedAt is set, ListUsers hides it).
    deleted = api.ok(api.send("DELETE", f"/v1/users/{ada['id']}"))
    assert deleted["id"] == ada["id"]
    assert deleted["deletedAt"]

    # ListUsers: GET /v1/users, paged with pageToken until the token is empty.
    pages: list[list[str]] = []
    token = ""
    while True:
        query = {"fullName": name, "pageSize": 2} | ({"pageToken": token} if token else {})
        page = api.ok(api.get("/v1/users", **query))
        pages.append([u["email"] for u in page["users"]])
        token = page["nextPageToken"]
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2]  # ada is deleted: 4 users left
    emails = [e for p in pages for e in p]
    assert {e.split(".")[0] for e in emails} == {"alan", "grace", "edsger", "barbara"}

    # UndeleteUser: POST /v1/users/{id}:undelete; ada is listed again, with the upsert's name.
    restored = api.ok(api.post(f"/v1/users/{ada['id']}:undelete", {}))
    assert "deletedAt" not in restored
    assert restored["lastName"] == "Byron"
    listed = api.ok(api.get("/v1/users", fullName=name, pageSize=10))
    assert len(listed["users"]) == 5
    assert listed["nextPageToken"] == ""

    # StreamUsers: GET /v1/users:stream, one UserBatch per line (newline-delimited JSON).
    batches = api.ok_lines(api.get("/v1/users:stream", batchSize=2))
    assert [len(b["users"]) for b in batches] == [2, 2, 1]
    ids = [int(u["id"]) for b in batches for u in b["users"]]
    assert ids == sorted(ids) and len(ids) == 5
    assert all(b["resumeToken"] for b in batches)
    # ... and it resumes after a batch from that batch's token.
    rest = api.ok_lines(
        api.get("/v1/users:stream", batchSize=2, resumeToken=batches[0]["resumeToken"])
    )
    assert [u["id"] for b in rest for u in b["users"]] == [str(i) for i in ids[2:]]

    api.assert_reached_every_rpc_of("shop.v1.UserService")


def test_import_users_wants_a_json_array(envoy_cluster: Cluster) -> None:
    """A single object is not a stream: Envoy answers 400 itself, nothing reaches a replica."""
    reply = curl(
        "-X",
        "POST",
        f"{envoy_cluster.url}/v1/users:import",
        "-H",
        "content-type: application/json",
        "-d",
        '{"users":[{"email":"one@example.com","firstName":"One","lastName":"Object"}]}',
    )

    assert reply.status == 400
    assert reply.body == "Expected an array instead of an object"


# --- OrderService --------------------------------------------------------------------------


@covers("shop.v1.OrderService")
def test_order_service_over_http(envoy_cluster: Cluster) -> None:
    api = Api(envoy_cluster)
    name = tag()
    user = api.ok(
        api.post(
            "/v1/users", {"email": f"{name}@example.com", "firstName": name, "lastName": "Buyer"}
        )
    )
    items = [
        {"sku": "BOOK-1", "quantity": 2, "unitPrice": "12.50"},
        {"sku": "PEN", "quantity": 3, "unitPrice": "0.99"},
    ]

    # CreateOrder: POST /v1/orders with a request_id; the same request_id again is the same
    # order, not a second one.
    order = {"userId": user["id"], "items": items, "requestId": f"order-{name}"}
    first = api.ok(api.post("/v1/orders", order))
    assert first["userId"] == user["id"]
    assert first["status"] == "ORDER_STATUS_PENDING"  # enums by name
    assert first["items"] == items
    assert first["total"] == "27.97"  # 2 x 12.50 + 3 x 0.99, a decimal string
    assert api.ok(api.post("/v1/orders", order)) == first
    others = [
        api.ok(
            api.post(
                "/v1/orders",
                {"userId": user["id"], "items": [item], "requestId": f"order-{name}-{i}"},
            )
        )
        for i, item in enumerate(items)
    ]
    assert [o["total"] for o in others] == ["25.00", "2.97"]

    # GetOrder: GET /v1/orders/{id}, with the buyer.
    fetched = api.ok(api.get(f"/v1/orders/{first['id']}"))
    assert fetched["total"] == "27.97"
    assert fetched["user"]["email"] == user["email"]

    # UpdateOrderStatus: POST /v1/orders/{id}:updateStatus.
    paid = api.ok(
        api.post(f"/v1/orders/{first['id']}:updateStatus", {"status": "ORDER_STATUS_PAID"})
    )
    assert paid["id"] == first["id"]
    assert paid["status"] == "ORDER_STATUS_PAID"

    # ListOrders: GET /v1/orders, by user, paged; and by status.
    ids: list[str] = []
    token = ""
    while True:
        query = {"userId": user["id"], "pageSize": 2} | ({"pageToken": token} if token else {})
        page = api.ok(api.get("/v1/orders", **query))
        assert len(page["orders"]) <= 2
        ids += [o["id"] for o in page["orders"]]
        token = page["nextPageToken"]
        if not token:
            break
    assert sorted(ids) == sorted([first["id"]] + [o["id"] for o in others])
    by_status = api.ok(api.get("/v1/orders", userId=user["id"], status="ORDER_STATUS_PAID"))
    assert [(o["id"], o["status"]) for o in by_status["orders"]] == [
        (first["id"], "ORDER_STATUS_PAID")
    ]

    # StreamOrders: GET /v1/orders:stream, newline-delimited OrderBatch messages.
    batches = api.ok_lines(api.get("/v1/orders:stream", userId=user["id"], batchSize=2))
    assert [len(b["orders"]) for b in batches] == [2, 1]
    streamed = {o["id"]: o["total"] for b in batches for o in b["orders"]}
    assert streamed == {first["id"]: "27.97", others[0]["id"]: "25.00", others[1]["id"]: "2.97"}

    api.assert_reached_every_rpc_of("shop.v1.OrderService")


# --- AccountService ------------------------------------------------------------------------


@covers("shop.v1.AccountService")
def test_account_service_over_http(envoy_cluster: Cluster) -> None:
    api = Api(envoy_cluster)
    name = tag()
    user = api.ok(
        api.post(
            "/v1/users", {"email": f"{name}@example.com", "firstName": name, "lastName": "Payer"}
        )
    )

    # OpenAccount: POST /v1/accounts.
    def open_account(label: str) -> Any:
        return api.ok(
            api.post(
                "/v1/accounts",
                {"userId": user["id"], "currency": "EUR", "requestId": f"{label}-{name}"},
            )
        )

    payer, payee = open_account("payer"), open_account("payee")
    assert (payer["userId"], payer["currency"], payer["balance"]) == (user["id"], "EUR", "0.00")

    # Deposit, Withdraw, Transfer: POST /v1/accounts/{id}:verb, amounts as decimal strings.
    deposit = api.post(
        f"/v1/accounts/{payer['id']}:deposit", {"amount": "100.10", "requestId": f"d-{name}"}
    )
    assert api.ok(deposit)["balance"] == "100.10"
    withdraw = api.post(
        f"/v1/accounts/{payer['id']}:withdraw", {"amount": "0.35", "requestId": f"w-{name}"}
    )
    assert api.ok(withdraw)["balance"] == "99.75"
    transfer = api.ok(
        api.post(
            f"/v1/accounts/{payer['id']}:transfer",
            {"toAccountId": payee["id"], "amount": "25.50", "requestId": f"t-{name}"},
        )
    )
    assert (transfer["fromAccountId"], transfer["toAccountId"]) == (payer["id"], payee["id"])
    assert (transfer["amount"], transfer["requestId"]) == ("25.50", f"t-{name}")

    # GetAccount: GET /v1/accounts/{id}, exact balances.
    def balance(account: Any) -> str:
        fetched = api.ok(api.get(f"/v1/accounts/{account['id']}"))
        assert fetched["id"] == account["id"]
        text: str = fetched["balance"]
        return text

    assert (balance(payer), balance(payee)) == ("74.25", "25.50")

    # BatchTransfer: POST /v1/accounts:batchTransfer; one item goes through, the other fails
    # with its own google.rpc.Status in the 200 answer, and changes nothing.
    batch = api.ok(
        api.post(
            "/v1/accounts:batchTransfer",
            {
                "requests": [
                    {
                        "fromAccountId": payer["id"],
                        "toAccountId": payee["id"],
                        "amount": "4.25",
                        "requestId": f"b1-{name}",
                    },
                    {
                        "fromAccountId": payee["id"],
                        "toAccountId": payer["id"],
                        "amount": "1000.00",
                        "requestId": f"b2-{name}",
                    },
                ]
            },
        )
    )
    good, bad = batch["results"]
    assert set(good) == {"transfer"}
    assert (good["transfer"]["amount"], good["transfer"]["requestId"]) == ("4.25", f"b1-{name}")
    assert set(bad) == {"error"}
    assert bad["error"]["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert bad["error"]["message"] == f"account {payee['id']} has insufficient funds"
    [info] = [d for d in bad["error"]["details"] if d["@type"] == ERROR_INFO]
    assert info["reason"] == "INSUFFICIENT_FUNDS"
    assert info["metadata"] == {"account_id": payee["id"], "requested": "1000.00"}
    assert (balance(payer), balance(payee)) == ("70.00", "29.75")

    # ListTransfers: GET /v1/accounts/{account_id}/transfers, newest first, paged.
    listed: list[tuple[str, str]] = []
    token = ""
    while True:
        query = {"pageSize": 3} | ({"pageToken": token} if token else {})
        page = api.ok(api.get(f"/v1/accounts/{payer['id']}/transfers", **query))
        listed += [(t["requestId"], t["amount"]) for t in page["transfers"]]
        token = page["nextPageToken"]
        if not token:
            break
    history = [
        (f"d-{name}", "100.10"),
        (f"w-{name}", "0.35"),
        (f"t-{name}", "25.50"),
        (f"b1-{name}", "4.25"),
    ]
    assert listed == history[::-1]

    # StreamTransfers: GET /v1/accounts/{account_id}/transfers:stream, oldest first, NDJSON.
    batches = api.ok_lines(api.get(f"/v1/accounts/{payer['id']}/transfers:stream", batchSize=3))
    assert [len(b["transfers"]) for b in batches] == [3, 1]
    assert [(t["requestId"], t["amount"]) for b in batches for t in b["transfers"]] == history

    api.assert_reached_every_rpc_of("shop.v1.AccountService")


# --- ChangeFeedService ---------------------------------------------------------------------


def until(messages: Iterator[Any], done: Callable[[Any], bool]) -> list[Any]:
    """The messages of a watch up to and including the first for which `done` holds."""
    seen = []
    for message in messages:
        seen.append(message)
        if done(message):
            return seen
    raise AssertionError("unreachable: messages() raises when the stream ends")


def changes_of(messages: list[Any], key: str, resource_id: str) -> list[tuple[str, str]]:
    """(operation, version) of each change of one resource (`key`: user, order, ...)."""
    return [
        (c["operation"], c["version"])
        for m in messages
        for c in m["changes"]
        if key in c and c[key]["id"] == resource_id
    ]


@covers("shop.v1.ChangeFeedService")
def test_change_feed_service_over_http(envoy_cluster: Cluster) -> None:
    api = Api(envoy_cluster)
    name = tag()
    user = api.ok(
        api.post(
            "/v1/users", {"email": f"{name}@example.com", "firstName": name, "lastName": "Watched"}
        )
    )
    # WatchChanges: GET /v1/changes:watch, newline-delimited WatchChangesResponse messages that
    # keep coming; a repeated enum is its name repeated in the query, values by enum name.
    query = [
        ("resourceTypes", "RESOURCE_TYPE_USER"),
        ("resourceTypes", "RESOURCE_TYPE_ORDER"),
        ("startPosition", "START_POSITION_SNAPSHOT"),
    ]
    with api.watch("/v1/changes:watch", query) as messages:
        # The snapshot (users and orders only, the user just created among them) first.
        snapshot = until(messages, lambda m: m["event"] == "CHANGE_FEED_EVENT_SNAPSHOT_DONE")
        rows = [c for m in snapshot for c in m["changes"]]
        assert {c["operation"] for c in rows} == {"OPERATION_SNAPSHOT"}
        assert {c["resourceType"] for c in rows} <= {"RESOURCE_TYPE_USER", "RESOURCE_TYPE_ORDER"}
        assert changes_of(snapshot, "user", user["id"]) == [("OPERATION_SNAPSHOT", "1")]
        [row] = [c for c in rows if c.get("user", {}).get("id") == user["id"]]
        assert row["user"] == user
        token = snapshot[-1]["resumeToken"]
        assert token

        # Then a change made through another route arrives on the open stream, in order.
        api.ok(
            api.send(
                "PATCH", f"/v1/users/{user['id']}", {"lastName": "Seen"}, {"updateMask": "lastName"}
            )
        )
        order = api.ok(
            api.post(
                "/v1/orders",
                {
                    "userId": user["id"],
                    "items": [{"sku": "FEED-1", "quantity": 1, "unitPrice": "3.50"}],
                    "requestId": f"feed-{name}",
                },
            )
        )
        tail = until(messages, lambda m: bool(changes_of([m], "order", order["id"])))
    assert changes_of(tail, "user", user["id"]) == [("OPERATION_UPDATED", "2")]
    assert changes_of(tail, "order", order["id"]) == [("OPERATION_CREATED", "1")]
    [updated] = [
        c["user"] for m in tail for c in m["changes"] if c.get("user", {}).get("id") == user["id"]
    ]
    assert (updated["lastName"], updated["fullName"]) == ("Seen", f"{name} Seen")
    sequences = [int(c["sequence"]) for m in snapshot + tail for c in m["changes"]]
    assert sequences == sorted(set(sequences))  # strictly increasing along the stream

    # Resumed from the snapshot's token (same types), on whichever replica Envoy picks: the
    # same changes with the same sequences, nothing of the snapshot again.
    resume = [(k, v) for k, v in query if k == "resourceTypes"] + [("resumeToken", token)]
    with api.watch("/v1/changes:watch", resume) as messages:
        again = until(messages, lambda m: bool(changes_of([m], "order", order["id"])))
    assert changes_of(again, "user", user["id"]) == [("OPERATION_UPDATED", "2")]
    mine = {"user": user["id"], "order": order["id"]}

    def sequences_of(batch: list[Any]) -> list[str]:
        return [
            c["sequence"]
            for m in batch
            for c in m["changes"]
            if any(key in c and c[key]["id"] == i for key, i in mine.items())
        ]

    assert sequences_of(again) == sequences_of(tail)

    api.assert_reached_every_rpc_of("shop.v1.ChangeFeedService")
