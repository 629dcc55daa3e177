"""Idle keep-alive connections for the ``idle-conns`` scenario, run as a child process:

    python -m bench.idleclient HOST PORT COUNT PATH [CONCURRENCY]

Opens COUNT connections, sends one ``GET PATH`` on each and reads the whole response (so the
proxy has made or reused an upstream connection and holds the downstream one in keep-alive),
then prints ``READY ok=N failed=M seconds=S`` and holds every socket open until its stdin
closes. At most CONCURRENCY (default 200) connections are being set up at once: the point is
idle connections, not a connect storm, and a storm would trip the proxies' upstream limits.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time

RESPONSE_HEAD_LIMIT = 64 * 1024  # bound on one response head we wait for


async def _one(host: str, port: int, request: bytes, keep: list[asyncio.StreamWriter]) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length:
            await asyncio.wait_for(reader.readexactly(length), 30)
        ok = head.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        ok = False
    if ok:
        keep.append(writer)
    else:
        writer.close()
    return ok


async def hold(host: str, port: int, count: int, path: str, concurrency: int = 200) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    keep: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(concurrency)

    async def guarded() -> bool:
        async with sem:
            return await _one(host, port, request, keep)

    t0 = time.monotonic()
    results = await asyncio.gather(*(guarded() for _ in range(count)))
    ok = sum(results)
    print(f"READY ok={ok} failed={count - ok} seconds={time.monotonic() - t0:.3f}", flush=True)
    loop = asyncio.get_running_loop()
    # Block (in a thread) until the harness closes our stdin.
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    for w in keep:
        w.close()


def main(argv: list[str]) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    host, port, count, path = argv[0], int(argv[1]), int(argv[2]), argv[3]
    concurrency = int(argv[4]) if len(argv) > 4 else 200
    asyncio.run(hold(host, port, count, path, concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
