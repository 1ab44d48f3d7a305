"""Follow shop-service's changes in NATS JetStream (docs/change-feed.md, "NATS JetStream
relay"): print each change the relay stored, one line each, from the stream's start or after
the sequence you kept.

    python examples/nats_consumer.py [--url nats://127.0.0.1:4222] [--stream SHOP_CHANGES]
                                     [--after SEQUENCE] [--count N]

Needs nats-py (`pip install 'shop-service[nats]'`) and the shop.v1 modules (generated/, on the
path once the project is installed). An ordered consumer: ephemeral, in stream order, recreated
by nats-py after a gap. The relay stores change `sequence` N as stream message N, so a consumer
that keeps the last sequence it applied resumes with --after it."""

from __future__ import annotations

import argparse
import asyncio

import nats
from google.protobuf import json_format
from nats.js.api import ConsumerConfig, DeliverPolicy
from shop.v1 import change_feed_service_pb2 as cf


async def follow(url: str, stream: str, after: int, count: int) -> None:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        if after:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
            )
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        subscription = await js.subscribe(
            "shop.changes.>", stream=stream, ordered_consumer=True, config=config
        )
        seen = 0
        async for message in subscription.messages:
            change = cf.Change.FromString(message.data)
            resource = getattr(change, change.WhichOneof("resource"))
            body = json_format.MessageToJson(resource, indent=None)
            operation = cf.Operation.Name(change.operation)
            print(f"{change.sequence} {message.subject} {operation} v{change.version} {body}")
            seen += 1
            if seen == count:
                break
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="SHOP_CHANGES")
    parser.add_argument("--after", type=int, default=0, help="last sequence already applied")
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    args = parser.parse_args()
    asyncio.run(follow(args.url, args.stream, args.after, args.count))


if __name__ == "__main__":
    main()
