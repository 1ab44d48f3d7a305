"""Command line: `python -m service serve` and `python -m service migrate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from datetime import timedelta

from pydantic import ValidationError

from service.config import Settings
from service.db.migrate import upgrade
from service.db.schema_state import SchemaBehind
from service.db.url import database_url
from service.housekeeping import prune_changes, purge_idempotency_keys
from service.observability.logs import configure_logging
from service.serving.security import InsecureBindError, check_exposure
from service.serving.workers import serve_processes

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shop-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve gRPC on SHOP_GRPC_HOST:SHOP_GRPC_PORT")
    commands.add_parser(
        "migrate",
        help="upgrade the database schema to the latest revision (the deploy step: safe to "
        "run twice or concurrently; see docs/migrations.md)",
    )
    commands.add_parser(
        "purge-idempotency-keys",
        help="forget request_ids older than SHOP_IDEMPOTENCY_RETENTION_HOURS",
    )
    commands.add_parser(
        "prune-changes", help="forget change-feed entries older than SHOP_CHANGES_RETENTION"
    )
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        # Status 2 and one line, as for a bad argument: the fix is in the environment, and
        # a traceback would only bury which variable it is.
        parser.exit(2, f"{parser.prog}: invalid configuration: {describe(exc)}\n")
    configure_logging(settings)
    if args.command == "serve":
        refuse_insecure_exposure(settings)
        refuse_relay_without_nats(settings)
    with database_url(settings) as url:
        if args.command == "migrate":
            upgrade(url)
            log.info("database schema is at head")
        elif args.command == "purge-idempotency-keys":
            retention = timedelta(hours=settings.idempotency_retention_hours)
            purged = asyncio.run(purge_idempotency_keys(url, retention))
            log.info("purged %d idempotency keys older than %s", purged, retention)
        elif args.command == "prune-changes":
            pruned = asyncio.run(prune_changes(url, settings.changes_retention))
            log.info(
                "pruned %d change-log entries older than %s", pruned, settings.changes_retention
            )
        else:
            try:
                status = serve_processes(settings, url)  # SHOP_WORKERS processes
            except SchemaBehind as exc:
                # A clear line and status 3, not a traceback: the fix is a deploy step.
                log.error("refusing to serve: %s", exc)
                raise SystemExit(3) from None
            if status:
                raise SystemExit(status)


def describe(error: ValidationError) -> str:
    """Each problem with the SHOP_* variable it concerns; never the value (it may be a secret:
    errors() carries each input, so only the location and message are read)."""
    prefix = Settings.model_config.get("env_prefix", "")
    problems = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        variable = "".join(f"{prefix}{part}".upper() for part in problem["loc"][:1])
        if variable and variable not in message:
            message = f"{variable}: {message}"
        problems.append(message)
    return "; ".join(problems)


def refuse_insecure_exposure(settings: Settings) -> None:
    """Exit with status 2, before any database starts, rather than serve the network openly."""
    try:
        check_exposure(settings)
    except InsecureBindError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None


def refuse_relay_without_nats(settings: Settings) -> None:
    """Exit with status 2 and one line, before any database starts, when the relay is asked
    for (SHOP_CHANGES_NATS_URL) but nats-py is missing (the Docker image leaves extras out)."""
    if settings.nats_url() is None:
        return
    try:
        import nats  # noqa: F401
    except ImportError:
        pass
    else:
        return
    log.error(
        "SHOP_CHANGES_NATS_URL is set but nats-py is not installed: "
        "pip install 'shop-service[nats]' (or unset SHOP_CHANGES_NATS_URL)"
    )
    raise SystemExit(2)


if __name__ == "__main__":
    main()
