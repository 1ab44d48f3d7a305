"""`make image-smoke`: build the image (deploy/image/build.py), then use it as an operator would,
against a PostgreSQL database of its own on this machine's server (created here, dropped after):

    python -m deploy.image.smoke [--no-build] [--pg-host H] [--pg-port P] [--pg-user U]

1. `python -m service migrate` in the image;
2. the compiled encoder loads in the image (the builder already fails without it);
3. `serve` in the image (the image's own command, host network, tokens set: it binds 0.0.0.0)
   until health answers SERVING, and the image's HEALTHCHECK passes;
4. CreateUser then GetUser through it, with a write token;
5. SIGTERM, and the server exits 0 (PID 1 in the container: the graceful stop).

Every wait is bounded; the containers and the database go even when a step fails. Exit status
0 when every step passed.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import grpc
from shop.v1 import user_service_pb2 as api
from shop.v1.user_service_pb2_grpc import UserServiceStub

from deploy.image.build import TAG, build_image
from deploy.image.podman import ImageError, podman
from deploy.processes import free_port, serving

MIGRATE_TIMEOUT = 180.0
START_TIMEOUT = 60.0  # serve's start in the container (a few seconds here)
# SIGTERM to exit: SHOP_SHUTDOWN_DRAIN_DELAY (5 s) then SHOP_SHUTDOWN_GRACE (10 s) at most.
STOP_TIMEOUT = 45.0
CALL_TIMEOUT = 10.0
ENCODER_CHECK = (
    "from service.api.users_encode import COMPILED; "
    "assert COMPILED, 'the compiled encoder did not load'; print('compiled encoder loaded')"
)


def step(message: str) -> None:
    print(f"image-smoke: {message}", flush=True)


@contextmanager
def scratch_database(host: str, port: int, user: str) -> Iterator[str]:
    """A new database on the server at host:port (trust auth); its asyncpg URL. Dropped after."""
    name = f"shop_image_smoke_{secrets.token_hex(4)}"

    def psql(sql: str) -> None:
        command = ["psql", "-h", host, "-p", str(port), "-U", user, "-d", "postgres"]
        try:
            subprocess.run(
                [*command, "-v", "ON_ERROR_STOP=1", "-qc", sql],
                timeout=60,
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as exc:
            raise ImageError(f"psql {sql!r} failed: {exc.stderr.strip()}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"psql {sql!r} failed: {exc}") from exc

    psql(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://{user}@{host}:{port}/{name}"
    finally:
        psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def env_flags(env: Mapping[str, str]) -> list[str]:
    return [f"--env={key}={value}" for key, value in env.items()]


@contextmanager
def container(image: str, name: str, env: Mapping[str, str]) -> Iterator[str]:
    """The image's own command (serve) in a detached container on the host's network; removed
    after, its log printed if it is still there when the block fails."""
    podman(["run", "--detach", f"--name={name}", "--network=host", *env_flags(env), image], 120)
    try:
        yield name
    except BaseException:
        logs = podman(["logs", "--tail=40", name], 30, check=False)
        print(f"--- last lines of {name}'s log ---\n{logs.stdout}{logs.stderr}", file=sys.stderr)
        raise
    finally:
        podman(["rm", "--force", "--time=2", name], 60, check=False)


def running(name: str) -> bool:
    state = podman(["inspect", "--format={{.State.Running}}", name], 30, check=False)
    return state.stdout.strip() == "true"


def wait_serving(name: str, port: int) -> None:
    """Until health on 127.0.0.1:port answers SERVING; fails if the container exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not running(name):
            raise ImageError(f"{name} exited before serving")
        if serving(f"127.0.0.1:{port}", timeout=2):
            return
        time.sleep(0.5)
    raise ImageError(f"{name} did not answer SERVING within {START_TIMEOUT:.0f} s")


def create_and_get(port: int, token: str) -> int:
    """CreateUser then GetUser through the server with `token`; the user's id."""
    metadata = (("authorization", f"Bearer {token}"),)
    email = f"image-smoke-{secrets.token_hex(4)}@example.com"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        users = UserServiceStub(channel)
        request = api.CreateUserRequest(email=email, first_name="Image", last_name="Smoke")
        created = users.CreateUser(request, metadata=metadata, timeout=CALL_TIMEOUT)
        got = users.GetUser(
            api.GetUserRequest(id=created.id), metadata=metadata, timeout=CALL_TIMEOUT
        )
    if (got.id, got.email) != (created.id, email):
        raise ImageError(f"GetUser({created.id}) answered {got.id}, {got.email!r}")
    return created.id


def stop_with_sigterm(name: str) -> int:
    """SIGTERM to the container's PID 1 (the server); its exit status."""
    podman(["kill", "--signal=TERM", name], 30)
    waited = podman(["wait", name], STOP_TIMEOUT)
    return int(waited.stdout.strip())


def smoke(image: str, database_url: str) -> None:
    token = secrets.token_urlsafe(16)
    port = free_port()
    env = {
        "SHOP_DATABASE_URL": database_url,
        "SHOP_GRPC_PORT": str(port),
        "SHOP_AUTH_TOKENS": f"{token}:write",
        "SHOP_PAGE_TOKEN_SECRET": secrets.token_urlsafe(32),
    }
    migrate = ["run", "--rm", "--network=host", *env_flags(env), image]
    podman([*migrate, "python", "-m", "service", "migrate"], MIGRATE_TIMEOUT)
    step("migrate in the image: exit 0")
    loaded = podman(["run", "--rm", image, "python", "-c", ENCODER_CHECK], 60)
    step(f"in the image: {loaded.stdout.strip()}")
    with container(image, f"shop-image-smoke-{secrets.token_hex(4)}", env) as name:
        wait_serving(name, port)
        step(f"serve in the image: SERVING on 0.0.0.0:{port}")
        # Run once here: podman schedules the HEALTHCHECK with systemd timers, and with no
        # systemd it only logs an error and never runs it (harmless, the output is captured).
        podman(["healthcheck", "run", name], 30)
        step("the image's HEALTHCHECK: healthy")
        user_id = create_and_get(port, token)
        step(f"CreateUser then GetUser({user_id}) with a write token: the same user")
        status = stop_with_sigterm(name)
        if status != 0:
            raise ImageError(f"serve exited {status} on SIGTERM, not 0")
        step("SIGTERM: serve exited 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.image.smoke", description=__doc__)
    parser.add_argument("--tag", default=TAG, help=f"the image (default {TAG})")
    parser.add_argument("--no-build", action="store_true", help="check the image as it is")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if not args.no_build:
            build_image(args.tag)
            step(f"built {args.tag} in {time.monotonic() - started:.0f} s")
        with scratch_database(args.pg_host, args.pg_port, args.pg_user) as url:
            smoke(args.tag, url)
    except (ImageError, grpc.RpcError) as exc:
        print(f"image-smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    step(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
