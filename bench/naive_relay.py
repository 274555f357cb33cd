"""The naive baseline: the simplest relay a person would write, one message at a time.

    python bench/naive_relay.py --queue Q --sim-url URL

An aio-pika consumer with prefetch 1: `async for message in queue.iterator()` → parse and
translate → POST with one shared `httpx.AsyncClient` (default settings) → ack, strictly in
sequence. It relays until the bench terminates it.
"""

from __future__ import annotations

import aio_pika
import httpx
from _contender import TOKEN, parse_args, ready_then_go, run

from consumer.contract import parse_event
from consumer.translate import translate


async def relay(url: str, queue_name: str, sim_url: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    connection = await aio_pika.connect(url)
    async with connection, httpx.AsyncClient(base_url=sim_url) as http:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(queue_name)
        await ready_then_go()
        async with queue.iterator() as messages:
            async for message in messages:
                request = translate(parse_event(message.body, max_bytes=256 * 1024))
                response = await http.post(request.path, content=request.body, headers=headers)
                response.raise_for_status()
                await message.ack()


if __name__ == "__main__":
    args = parse_args(__doc__)
    run(relay(args.amqp_url, args.queue, args.sim_url), use_uvloop=args.uvloop)
