"""Bounded request bodies: an ASGI middleware that reads each request's body before the routes
see it, refusing one larger than ``max_bytes`` (413, before reading it when its Content-Length
says so) and one that does not arrive within ``seconds`` (408: a client trickling its body would
otherwise hold a connection, and a place under the server's concurrency limit, for as long as it
likes).  The routes then read the buffered body; later ``receive`` calls (a route watching for
the client leaving) go to the connection as before.
"""

from __future__ import annotations

import asyncio
import json

from looplm.serve.protocol import error_body

MAX_BODY_BYTES = 4 << 20   # a request body's bytes (the largest allowed request is far smaller)
BODY_SECONDS = 30.0        # to receive a whole body


class BoundedBodies:
    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, seconds: float = BODY_SECONDS):
        self.app, self.max_bytes, self.seconds = app, max_bytes, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _refuse(send, 413, self._too_large())
        chunks, received = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return await _refuse(send, 408, f"the request body did not arrive within {self.seconds:g} s: send it"
                                                " at once")
            if message["type"] == "http.disconnect":  # the client left before sending it all
                return None
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                return await _refuse(send, 413, self._too_large())
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return buffered.pop() if buffered else await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes: send fewer or shorter prompts"


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps(error_body(message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
