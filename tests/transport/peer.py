"""A blobmesh endpoint in its own process, for integration tests.

Prints its ticket on the first line of stdout, then serves until SIGTERM:

- ``echo``: sends every message back;
- ``sink``: counts bytes until the stream closes, then replies with the count (ASCII);
- ``source``: receives ``b"SIZE CHUNK"`` and sends SIZE bytes in CHUNK-byte messages;
- ``dialback``: receives a ticket, opens an ``echo`` stream to it, round-trips one message
  and replies with what came back.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from blobmesh.errors import StreamClosedError
from blobmesh.transport import Endpoint, Identity, Stream, Ticket, TransportConfig


async def echo(stream: Stream) -> None:
    while True:
        try:
            message = await stream.recv()
        except StreamClosedError:
            return
        await stream.send(message)


async def sink(stream: Stream) -> None:
    total = 0
    while True:
        try:
            total += len(await stream.recv())
        except StreamClosedError:
            break
    await stream.send(str(total).encode())


async def source(stream: Stream) -> None:
    size, chunk = map(int, (await stream.recv()).split())
    block = bytes(chunk)
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        await stream.send(block if n == chunk else block[:n])
        sent += n
    await stream.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--idle", type=float, default=120.0)
    args = parser.parse_args()
    config = TransportConfig(stream_window=args.window, max_message_size=args.window,
                             idle_timeout=args.idle)
    async with await Endpoint.start(Identity.generate(), config=config) as ep:

        async def dialback(stream: Stream) -> None:
            node = ep.add_ticket(Ticket.parse((await stream.recv()).decode()))
            back = await ep.open_stream(node, "echo")
            await back.send(b"ping from the peer")
            reply = await back.recv()
            await back.close()
            await stream.send(reply)

        for name, handler in (("echo", echo), ("sink", sink), ("source", source),
                              ("dialback", dialback)):
            ep.set_handler(name, handler)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(ep.ticket, flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
