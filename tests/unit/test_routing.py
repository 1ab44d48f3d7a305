"""The read-routing table (service/api/methods.py) against the contract, the issue and the table
in docs/scale-out.md (Read replicas); and the replica lag rule (service/db/replicas.py)."""

from __future__ import annotations

import math
import re

from service.api.methods import ROUTES, route_of
from service.config import Settings
from service.db.replicas import ReplayClock, Replica, Replicas
from service.db.routing import PRIMARY, REPLICA
from tests.rpc import SHOP_RPCS
from tests.tools import ROOT

METHODS = set(SHOP_RPCS)
STALE_OK = {
    "/shop.v1.UserService/ListUsers",
    "/shop.v1.UserService/StreamUsers",
    "/shop.v1.OrderService/ListOrders",
    "/shop.v1.OrderService/StreamOrders",
    "/shop.v1.AccountService/ListTransfers",
    "/shop.v1.AccountService/StreamTransfers",
    "/shop.v1.ChangeFeedService/WatchChanges",
}


def test_every_row_names_a_real_rpc() -> None:
    # A misspelt row would silently read the primary.
    assert set(ROUTES) <= METHODS


def test_the_replica_reads_are_the_pages_and_exports() -> None:
    assert {method for method in METHODS if route_of(method) is REPLICA} == STALE_OK


def test_money_and_writes_read_the_primary() -> None:
    assert route_of("/shop.v1.AccountService/GetAccount") is PRIMARY
    assert route_of("/shop.v1.AccountService/Transfer") is PRIMARY
    assert route_of("/shop.v1.UserService/CreateUser") is PRIMARY
    assert route_of("/shop.v1.Unknown/Method") is PRIMARY


def test_the_docs_mirror_the_table() -> None:
    doc = (ROOT / "docs" / "scale-out.md").read_text()
    for method, route in ROUTES.items():
        name = method.rsplit("/", 1)[1]
        row = re.search(rf"^\| `{name}` \| (\w+) \|", doc, re.MULTILINE)
        assert row is not None, f"docs/scale-out.md's read table has no row for {name}"
        assert row.group(1) == route.reads_from.value, name


def test_replica_urls_are_comma_separated() -> None:
    assert Settings().replica_urls() == []
    settings = Settings(database_replica_urls=" postgresql+asyncpg://a/db , ,postgresql://b/db")
    assert settings.replica_urls() == ["postgresql+asyncpg://a/db", "postgresql://b/db"]


def test_lag_is_zero_when_replay_has_caught_up_with_what_was_received() -> None:
    # An idle primary: the last replayed commit is an hour old, yet nothing is missing.
    assert ReplayClock().lag(0.0, received=100, replayed=100, replay_age=3600.0) == 0.0


def test_the_first_write_after_an_idle_spell_is_not_an_hour_of_lag() -> None:
    clock = ReplayClock()
    assert clock.lag(10.0, received=100, replayed=100, replay_age=3600.0) == 0.0
    # Half a second later a write arrives; replay is a moment behind at the check.
    assert clock.lag(10.5, received=200, replayed=150, replay_age=3600.5) == 0.5


def test_a_busy_replica_lags_by_its_newest_replayed_commit() -> None:
    clock = ReplayClock()
    assert clock.lag(1.0, received=100, replayed=90, replay_age=0.01) == 0.01
    assert clock.lag(1.5, received=200, replayed=150, replay_age=0.02) == 0.02


def test_a_stopped_replay_lags_more_at_every_check() -> None:
    clock = ReplayClock()
    assert clock.lag(0.0, received=100, replayed=100, replay_age=0.0) == 0.0
    lags = [clock.lag(t, received=100 + t, replayed=100, replay_age=None) for t in (1, 2, 3)]
    assert lags == [1.0, 2.0, 3.0]


def test_a_lag_with_nothing_to_go_on_is_unknown() -> None:
    assert ReplayClock().lag(0.0, received=None, replayed=5, replay_age=None) == math.inf


def test_reads_take_the_usable_replicas_in_turn_and_none_means_the_primary() -> None:
    a, b, c = (Replica(name, None, None, None) for name in "abc")  # type: ignore[arg-type]
    a.usable = c.usable = True
    replicas = Replicas([a, b, c], max_lag=1.0, interval=0.5, timeout=1.0)
    assert [replicas.pick() for _ in range(4)] == [a, c, a, c]  # round robin, b skipped
    a.usable = c.usable = False
    assert replicas.pick() is None  # read the primary
