#!/usr/bin/env python3
"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one GET on each, reads the answer,
then holds them idle until killed. Writes "ready N" to READY_FILE once all N have answered
(or "failed K" if some could not). Used by benches/memory.sh; loopback only."""
import asyncio
import sys


async def one(port, held, failed, sem):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(r.readexactly(length), 10)
            if not head.startswith(b"HTTP/1.1 200"):
                failed.append(head[:40])
            held.append((r, w))
        except Exception as e:  # noqa: BLE001 - counted, not raised
            failed.append(repr(e)[:80])


async def main():
    port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    held, failed = [], []
    sem = asyncio.Semaphore(200)
    await asyncio.gather(*(one(port, held, failed, sem) for _ in range(n)))
    with open(ready, "w") as f:
        f.write(f"ready {len(held)}\n" if not failed else f"failed {len(failed)} {failed[:3]}\n")
    await asyncio.sleep(3600)


asyncio.run(main())
