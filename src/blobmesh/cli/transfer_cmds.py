"""Transfer commands: serve, get, push (over the TLS transport)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass

from rich.progress import Progress, TaskID

from blobmesh.cli.collection_cmds import export_any, transfer_members
from blobmesh.cli.output import byte_progress, err_console, human_bytes
from blobmesh.cli.store_cmds import resolve_blob
from blobmesh.hashing import BlobId
from blobmesh.store import Store
from blobmesh.transfer import (
    AcceptAll,
    ChannelId,
    ChannelState,
    Event,
    EventCode,
    Status,
    TransferConfig,
    TransferManager,
    Voucher,
)
from blobmesh.transport import Endpoint, Identity, NodeId, Ticket, install_uvloop, tune_malloc
from blobmesh.transport.ticket import parse_listen_address

VOUCHER = "blobmesh/open"
"""The voucher type of CLI transfers: the TLS-authenticated peer is all ``serve`` checks."""
DEFAULT_LISTEN = "0.0.0.0:4919"
MiB = 1024 * 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve this home's blobs to peers",
                       description="Serve this home's store. Prints the node's ticket alone on "
                                   "the first line, then runs until interrupted.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to listen on (default {DEFAULT_LISTEN})")
    p.add_argument("--accept-push", action="store_true", help="accept blobs pushed to us")
    _window_flag(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("get", help="fetch a blob from a peer (verified, resumable)",
                       description="Fetch a blob from a peer into the store; an interrupted "
                                   "get resumes where it stopped.")
    p.add_argument("blob", metavar="ID", help="the full id of the blob to fetch")
    p.add_argument("--from", dest="ticket", required=True, metavar="TICKET",
                   help="ticket of the peer to fetch from (blobmesh ticket, on it)")
    p.add_argument("-o", "--output", metavar="PATH", help="also export the blob to PATH")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    _window_flag(p)
    p.set_defaults(handler=cmd_get)

    p = sub.add_parser("push", help="send a blob to a peer serving with --accept-push",
                       description="send a blob to a peer serving with --accept-push")
    p.add_argument("blob", metavar="ID", help="a blob id or a unique prefix of one here")
    p.add_argument("--to", dest="ticket", required=True, metavar="TICKET",
                   help="ticket of the peer to push to")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    _window_flag(p)
    p.set_defaults(handler=cmd_push)


def _window_flag(p: argparse.ArgumentParser) -> None:
    default = TransferConfig().window // MiB
    p.add_argument("--window", type=int, default=default, metavar="MIB",
                   help=f"unacknowledged MiB a sender keeps in flight, and so re-sends at "
                        f"most after a crash (default {default})")


def _config(args: argparse.Namespace) -> TransferConfig:
    window = max(1, args.window) * MiB
    return TransferConfig(window=window, flush_bytes=window // 4)


def _run(main: Callable[[], Coroutine[None, None, None]]) -> None:
    """Run ``main`` until it finishes or SIGINT/SIGTERM arrives (then it is cancelled and
    its cleanup runs); a signal re-raises as KeyboardInterrupt for the CLI's exit code."""
    install_uvloop()
    tune_malloc()  # as a node does: received and read pieces then cost no page faults
    interrupted = False

    async def runner() -> None:
        nonlocal interrupted
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            await main()
        except asyncio.CancelledError:
            if not interrupted:
                raise

    asyncio.run(runner())
    if interrupted:
        raise KeyboardInterrupt


@contextlib.asynccontextmanager
async def _node(args: argparse.Namespace, listen: str, *, resume: bool
                ) -> AsyncIterator[tuple[Store, Endpoint, TransferManager]]:
    with Store(args.home) as store:
        identity = Identity.load_or_create(store.home)
        async with await Endpoint.start(identity, listen=parse_listen_address(listen)) as ep:
            mgr = TransferManager(ep, store, config=_config(args))
            await mgr.start(resume=resume)
            try:
                yield store, ep, mgr
            finally:
                await mgr.aclose()


# --- serve -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    async def main() -> None:
        async with _node(args, args.listen, resume=True) as (_, ep, mgr):
            mgr.register_voucher_type(VOUCHER, AcceptAll(push=args.accept_push))
            mgr.subscribe(_log_channel)
            sys.stdout.write(f"{ep.ticket}\n")
            sys.stdout.flush()
            host, port = ep.listen_address
            sys.stderr.write(f"serving {ep.node_id} on {host}:{port}"
                             + (" (accepting pushes)\n" if args.accept_push else "\n"))
            await asyncio.Event().wait()

    try:
        _run(main)
    except KeyboardInterrupt:
        err_console.print("stopped")
    return 0


def _log_channel(event: Event, state: ChannelState) -> None:
    """One stderr line per channel milestone, with the counters tests and operators need."""
    if event.code in (EventCode.OPEN, EventCode.ACCEPT, EventCode.COMPLETE, EventCode.ERROR,
                      EventCode.CANCEL, EventCode.DISCONNECTED, EventCode.RESTART,
                      EventCode.STALLED):
        moved = state.sent if state.sender == state.self_peer else state.received
        sys.stderr.write(
            f"channel {event.channel_id} {'pull' if state.is_pull else 'push'} "
            f"{state.blob_id.short()} {event.code.value}: {event.message} "
            f"[verified={moved} total={state.total} wire={state.wire_bytes} "
            f"restarts={state.restarts}]\n")
        sys.stderr.flush()


# --- get / push ------------------------------------------------------------------------------


@dataclass
class _Outcome:
    state: ChannelState | None = None
    seconds: float = 0.0


def cmd_get(args: argparse.Namespace) -> int:
    return _transfer(args, pull=True)


def cmd_push(args: argparse.Namespace) -> int:
    return _transfer(args, pull=False)


def _transfer(args: argparse.Namespace, *, pull: bool) -> int:
    if pull:
        blob_id = BlobId.parse(args.blob)  # a blob not here yet: no prefix to resolve
    else:
        with Store(args.home) as store:
            blob_id = resolve_blob(store, args.blob)
    ticket = Ticket.parse(args.ticket)
    out = _Outcome()

    async def main() -> None:
        async with _node(args, "127.0.0.1:0", resume=False) as (store, ep, mgr):
            peer = ep.add_ticket(ticket)
            if pull and store.has(blob_id):
                # a collection held here may still lack members
                await transfer_members(mgr, store, peer, blob_id, Voucher(VOUCHER), pull=True)
                if args.output:
                    await asyncio.to_thread(export_any, store, blob_id, args.output)
                return
            chid = _unfinished(mgr, blob_id, peer, pull)
            if chid is not None:
                await mgr.restart(chid)
            elif pull:
                chid = await mgr.open_pull(peer, Voucher(VOUCHER), blob_id)
            else:
                chid = await mgr.open_push(peer, Voucher(VOUCHER), blob_id)
            start = time.monotonic()
            verb = "getting" if pull else "pushing"
            with byte_progress(sys.stderr.isatty()) as progress:
                task = progress.add_task(f"{verb} {blob_id.short()}", total=None)
                unsubscribe = mgr.subscribe(_progress_updater(progress, task, chid, pull))
                try:
                    out.state = await mgr.wait(chid)
                finally:
                    unsubscribe()
                    if out.state is None:
                        _report_interrupted(mgr.channel_state(chid), pull)
            out.seconds = time.monotonic() - start
            if pull:
                # what came over the network stays until the user unpins it (GC keeps it)
                await asyncio.to_thread(store.pin, blob_id, f"get/{blob_id}")
            # a collection: its members follow
            await transfer_members(mgr, store, peer, blob_id, Voucher(VOUCHER), pull=pull)
            if pull and args.output:
                await asyncio.to_thread(export_any, store, blob_id, args.output)

    _run(main)
    _report_done(args, blob_id, ticket, out, pull)
    return 0


def _unfinished(mgr: TransferManager, blob_id: BlobId, peer: NodeId,
                pull: bool) -> ChannelId | None:
    """The channel an interrupted earlier run of the same command left, to restart it."""
    for chid, st in mgr.in_progress_channels().items():
        if (st.blob_id == blob_id and st.is_pull == pull and chid.responder == peer
                and chid.initiator == mgr.node_id):
            return chid
    return None


def _progress_updater(progress: Progress, task: TaskID, chid: ChannelId,
                      pull: bool) -> Callable[[Event, ChannelState], None]:
    def update(event: Event, state: ChannelState) -> None:
        if event.channel_id != chid:
            return
        done = state.received if pull else state.sent
        progress.update(task, total=state.total or None, completed=done)
        if event.code in (EventCode.DISCONNECTED, EventCode.STALLED, EventCode.RESTART):
            err_console.print(f"{event.code.value}: {event.message}")

    return update


def _report_interrupted(state: ChannelState, pull: bool) -> None:
    done = state.received if pull else state.sent
    if state.status in (Status.FAILED, Status.CANCELLED):
        return
    err_console.print(f"interrupted at {human_bytes(done)} of {human_bytes(state.total)}; "
                      "run the same command again to resume")


def _report_done(args: argparse.Namespace, blob_id: BlobId, ticket: Ticket, out: _Outcome,
                 pull: bool) -> None:
    st = out.state
    if st is None:  # the blob was already here
        if args.json:
            print(json.dumps({"blob": str(blob_id), "already_present": True}))
        else:
            print(f"already have {blob_id}" + (f" (exported to {args.output})"
                                               if args.output else ""))
        return
    moved = st.received if pull else st.sent
    rate = moved / out.seconds if out.seconds > 0 else 0.0
    if args.json:
        print(json.dumps({
            "blob": str(blob_id), "peer": str(ticket.node_id), "bytes": moved,
            "total": st.total, "wire_bytes": st.wire_bytes, "restarts": st.restarts,
            "elapsed_seconds": round(out.seconds, 3),
            "output": args.output if pull else None}))
        return
    verb, prep = ("got", "from") if pull else ("pushed", "to")
    print(f"{verb} {blob_id} ({human_bytes(st.total)}) {prep} {ticket.node_id.short()} in "
          f"{out.seconds:.1f}s ({human_bytes(rate)}/s)"
          + (f", {st.restarts} restarts, {human_bytes(st.wire_bytes)} on the wire"
             if st.restarts else "")
          + (f"; exported to {args.output}" if pull and args.output else ""))
