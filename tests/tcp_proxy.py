"""A TCP proxy between a test's channel and its server, to observe the wire: it keeps the bytes
the server sent, can stop forwarding (a peer that went silent: no ping answered), and notes
when the server closed its side. Plus a reader of those bytes as HTTP/2 frames and gRPC
messages (no HPACK: the headers are not decoded, the messages' own flags say enough)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy import make_url

DATA = 0x0
SETTINGS = 0x4
GOAWAY = 0x7
PADDED = 0x8


@dataclass
class Link:
    """One proxied connection."""

    from_server: bytearray = field(default_factory=bytearray)
    silent: bool = False  # forwards nothing either way; keeps reading (and dropping) both
    server_closed: asyncio.Event = field(default_factory=asyncio.Event)
    server_closed_at: float | None = None


class TcpProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<upstream_port>, or to a Unix socket (the
    embedded PostgreSQL listens on one only)."""

    def __init__(self, upstream_port: int, upstream_socket: str | None = None) -> None:
        self.upstream_port = upstream_port
        self.upstream_socket = upstream_socket
        self.links: list[Link] = []
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._listener: asyncio.Server | None = None
        # While set, connections made from now on are silent from the start too (a host that
        # stopped answering rather than one that refuses).
        self.new_links_silent = False

    def go_silent(self) -> None:
        """Every connection stops forwarding, as if the client's host vanished."""
        for link in self.links:
            link.silent = True

    async def close(self) -> None:
        """Stop listening and end every connection (silent ones too); a second call is a no-op."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        if self.upstream_socket is not None:
            server, to_server = await asyncio.open_unix_connection(self.upstream_socket)
        else:
            server, to_server = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [to_client, to_server]
        link = Link(silent=self.new_links_silent)
        self.links.append(link)
        for pump in (
            self._pump(client, to_server, link),
            self._from_server(server, to_client, link),
        ):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not link.silent:
                    writer.write(data)
                    await writer.drain()

    async def _from_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                link.from_server += data
                if not link.silent:
                    writer.write(data)
                    await writer.drain()
        link.server_closed_at = asyncio.get_running_loop().time()
        link.server_closed.set()
        if not link.silent:
            writer.close()  # the server hung up: so does the proxy, or the client would wait


@asynccontextmanager
async def tcp_proxy(
    upstream_port: int, upstream_socket: str | None = None
) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(upstream_port, upstream_socket)
    proxy._listener = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
    proxy.port = proxy._listener.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        await proxy.close()


@asynccontextmanager
async def database_proxy(database_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy in front of the database of `database_url`, and the URL that goes through it."""
    url = make_url(database_url)
    # The embedded PostgreSQL listens on a Unix socket only (?host=<dir> in its URL).
    socket_dir = url.query.get("host")
    socket = f"{socket_dir}/.s.PGSQL.{url.port or 5432}" if isinstance(socket_dir, str) else None
    async with tcp_proxy(url.port or 5432, socket) as proxy:
        through = url.difference_update_query(["host"]).set(host="127.0.0.1", port=proxy.port)
        yield proxy, through.render_as_string(hide_password=False)


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes


def http2_frames(from_server: bytes) -> list[Frame]:
    """The HTTP/2 frames of a server's byte stream (a server sends no preface)."""
    frames = []
    at = 0
    while at + 9 <= len(from_server):
        length = int.from_bytes(from_server[at : at + 3], "big")
        stream_id = int.from_bytes(from_server[at + 5 : at + 9], "big") & 0x7FFFFFFF
        payload = bytes(from_server[at + 9 : at + 9 + length])
        frames.append(Frame(from_server[at + 3], from_server[at + 4], stream_id, payload))
        at += 9 + length
    return frames


def settings_of(frame: Frame) -> dict[int, int]:
    """A SETTINGS frame's parameters: identifier -> value."""
    body = frame.payload
    return {
        int.from_bytes(body[at : at + 2], "big"): int.from_bytes(body[at + 2 : at + 6], "big")
        for at in range(0, len(body) - 5, 6)
    }


@dataclass(frozen=True)
class GrpcMessage:
    stream_id: int
    compressed: bool  # the message's Compressed-Flag: its bytes are in the call's grpc-encoding
    payload: bytes


def grpc_messages(from_server: bytes) -> list[GrpcMessage]:
    """The length-prefixed gRPC messages in the DATA frames of a server's HTTP/2 byte stream."""
    streams: dict[int, bytearray] = defaultdict(bytearray)
    for frame in http2_frames(from_server):
        if frame.kind == DATA:
            payload = frame.payload
            if frame.flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            streams[frame.stream_id] += payload
    messages = []
    for stream_id, body in sorted(streams.items()):
        at = 0
        while at + 5 <= len(body):
            size = int.from_bytes(body[at + 1 : at + 5], "big")
            messages.append(
                GrpcMessage(stream_id, body[at] == 1, bytes(body[at + 5 : at + 5 + size]))
            )
            at += 5 + size
    return messages
