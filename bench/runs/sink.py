"""The loopback HTTP sink every benchmarked job calls: it records when each request lands.

Run in its own process (``python bench/runs/sink.py --port 0``) so that it never competes
with the measured scheduler for a GIL; it prints ``PORT <n>`` once listening on 127.0.0.1.
Standard library only (it runs under either virtualenv).

Endpoints (HTTP/1.1, keep-alive, any method):

- ``/hit?run=TAG&job=ID&due=EPOCH`` — a job landing: ``time.time()`` of the moment its
  request head was read is recorded with the tag, job id and due time, answered ``200 ok``;
- ``/_count?run=TAG`` — ``{"hits": n, "unique": u}`` for that tag (``u`` distinct job ids);
- ``/_dump?run=TAG`` — ``[[arrival, job, due], ...]`` for that tag, in arrival order;
- ``/_forget?run=TAG`` — drop that tag's records (memory stays bounded over a long run).

The request parser is deliberately minimal (request line, headers, ``Content-Length``
body): it only ever talks to the bench's own clients on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import parse_qs, urlsplit

Record = tuple[float, str, float]


class Sink:
    """In-memory records, per run tag."""

    def __init__(self) -> None:
        self.records: dict[str, list[Record]] = {}
        self.unique: dict[str, set[str]] = {}

    def handle(self, target: str, arrival: float) -> tuple[int, bytes]:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        tag = query.get("run", [""])[0]
        if parts.path == "/hit":
            job = query.get("job", [""])[0]
            try:
                due = float(query.get("due", ["nan"])[0])
            except ValueError:
                due = float("nan")
            self.records.setdefault(tag, []).append((arrival, job, due))
            self.unique.setdefault(tag, set()).add(job)
            return 200, b"ok"
        if parts.path == "/_count":
            body = {"hits": len(self.records.get(tag, ())),
                    "unique": len(self.unique.get(tag, ()))}
            return 200, json.dumps(body).encode()
        if parts.path == "/_dump":
            return 200, json.dumps(self.records.get(tag, [])).encode()
        if parts.path == "/_forget":
            self.records.pop(tag, None)
            self.unique.pop(tag, None)
            return 200, b'{"ok": true}'
        return 404, b"not found"


async def serve_connection(
    sink: Sink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            arrival = time.time()
            lines = head.decode("latin-1").split("\r\n")
            request = lines[0].split(" ")
            if len(request) < 3:
                return
            length, close = 0, request[2] == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip() or 0)
                elif name == "connection":
                    close = value.strip().lower() == "close"
            if length:
                await reader.readexactly(length)
            status, body = sink.handle(request[1], arrival)
            reason = "OK" if status == 200 else "Not Found"
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + body
            )
            await writer.drain()
            if close:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def main(port: int) -> None:
    sink = Sink()
    server = await asyncio.start_server(
        lambda r, w: serve_connection(sink, r, w), "127.0.0.1", port, backlog=1024
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
