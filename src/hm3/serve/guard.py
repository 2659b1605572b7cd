"""The ASGI layers in front of the routes: every request observed (status and latency), the API
key checked, the body read within its byte and time limits before any route sees it.

Plain ASGI middlewares rather than Starlette's `@app.middleware("http")`, which runs every request
through a task group and memory streams, a cost each one-text request pays. Every refusal is the
app's JSON shape, `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Callable

LIVENESS = "/health"  # the one route open without a key: a process that answers is alive


async def send_error(send, status: int, message: str,
                     headers: dict[str, str] | None = None) -> None:
    """Answer with the app's error shape, straight on the ASGI `send`."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Observe:
    """Counts every HTTP request by route and status and times it, whatever answered it (a route,
    a middleware, an error); a client that left before its answer counts as 499."""

    def __init__(self, app, record: Callable[[str, int, float], None], routes: frozenset[str]):
        self.app, self.record, self.routes = app, record, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 499
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            self.record(route, status, time.perf_counter() - start)


class RequireKey:
    """Every route but liveness needs `Authorization: Bearer KEY` with one of `keys` (401
    otherwise); each key is compared in constant time, and all of them are tried."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != LIVENESS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            matched = False
            for key in self.keys:
                matched |= hmac.compare_digest(token.strip(), key)
            if scheme.lower() != b"bearer" or not matched:
                await send_error(send, 401, "missing or wrong API key: send the header "
                                 "`Authorization: Bearer KEY`", {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class ReadBody:
    """Reads a request's whole body before the app runs, counting the bytes actually received:
    413 as soon as more than `limit` arrive (declared or not, chunked bodies included), 408 when
    the body takes over `timeout` seconds, 503 when the bodies of all requests in flight would
    hold more than `budget` bytes (so many large uploads at once cannot exhaust memory). The app
    then receives the body as one message, and after it the connection's own events (so a route
    can notice the client leaving)."""

    def __init__(self, app, limit: int, timeout: float, budget: int):
        self.app, self.limit, self.timeout, self.budget = app, limit, timeout, budget
        self.held = 0  # bytes of the bodies of the requests in flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await send_error(send, 413, self._too_large(f"{int(length)} bytes"))
            return
        mine = [0]  # bytes of this request's body, counted in `held` until it is answered
        try:
            body = await self._read(receive, send, mine)
            if body is not None:
                await self.app(scope, self._replay(body, receive), send)
        finally:
            self.held -= mine[0]

    async def _read(self, receive, send, mine: list[int]) -> bytes | None:
        """The body, or None when an error was sent (or the client left)."""
        chunks = []
        deadline = asyncio.get_running_loop().time() + self.timeout
        more = True
        while more:
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                await send_error(send, 408, f"the request body took over {self.timeout:g} s to "
                                 "arrive; send it at once", {"Connection": "close"})
                return None
            except Exception:  # noqa: BLE001 - the connection is gone (Ray's proxy stopping)
                return None
            if message["type"] == "http.disconnect":
                return None  # the client left (or the server is stopping): no one to answer
            chunk = message.get("body", b"")
            if mine[0] + len(chunk) > self.limit:
                await send_error(send, 413, self._too_large(f"over {self.limit} bytes"),
                                 {"Connection": "close"})
                return None
            if self.held + len(chunk) > self.budget:
                await send_error(send, 503, "the server holds too many request bodies; retry "
                                 "shortly", {"Retry-After": "1", "Connection": "close"})
                return None
            self.held += len(chunk)
            mine[0] += len(chunk)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _too_large(self, size: str) -> str:
        return (f"the request body is {size}, over the limit of {self.limit} bytes; send fewer "
                "or shorter texts per request")


async def wait_for_disconnect(receive) -> None:
    """Returns once the client has gone (`receive` after the body gives only that event)."""
    while (await receive())["type"] != "http.disconnect":
        pass
