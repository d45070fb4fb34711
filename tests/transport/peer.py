"""A blobmesh endpoint in its own process, for integration tests.

Prints its ticket on the first line of stdout, then serves until SIGTERM:

- ``echo``: sends every message back;
- ``sink``: counts bytes until the stream closes, then replies with the count (ASCII);
- ``source``: receives ``b"SIZE CHUNK"`` and sends SIZE bytes in CHUNK-byte messages;
- ``dialback``: receives a ticket, opens an ``echo`` stream to it, round-trips one message
  and replies with what came back;
- ``pattern-source``: receives ``b"SIZE SEED"`` and sends SIZE bytes of :func:`pattern`;
- ``pattern-sink``: receives ``b"SEED"``, then checks every message against :func:`pattern`
  until the stream closes and replies ``b"ok BYTES"`` or ``b"bad at INDEX"``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from functools import cache

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


PATTERN_CHUNK = 1024 * 1024


@cache
def _blocks(seed: int) -> tuple[bytes, ...]:
    rng = random.Random(seed)
    return tuple(rng.randbytes(PATTERN_CHUNK) for _ in range(3))


def pattern(seed: int, index: int) -> bytes:
    """Message ``index`` of a deterministic stream: its index, then pseudo-random bytes."""
    return index.to_bytes(8, "big") + _blocks(seed)[index % 3][8:]


async def pattern_source(stream: Stream) -> None:
    size, seed = map(int, (await stream.recv()).split())
    for i in range(size // PATTERN_CHUNK):
        await stream.send(pattern(seed, i))
    await stream.close()


async def pattern_sink(stream: Stream) -> None:
    seed = int(await stream.recv())
    index = total = 0
    bad: int | None = None
    while True:
        try:
            message = await stream.recv()
        except StreamClosedError:
            break
        if bad is None and message != pattern(seed, index):
            bad = index
        index += 1
        total += len(message)
    await stream.send(f"ok {total}".encode() if bad is None else f"bad at {bad}".encode())


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
                              ("dialback", dialback), ("pattern-source", pattern_source),
                              ("pattern-sink", pattern_sink)):
            ep.set_handler(name, handler)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(ep.ticket, flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
