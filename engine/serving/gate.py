"""The server's door: the API key, then the request body-size cap, before anything is parsed.

A pure ASGI middleware. The body is read here in full (up to the cap) so that an
oversize body is refused with 413 even when it is chunked and declares no length;
the app then gets it replayed, and later receive() calls (the disconnect watch)
go through to the connection.
"""
import asyncio
import hmac
from typing import Optional

from engine.serving.protocol import error_response

OPEN_PATHS = frozenset({"/health"})  # everything else needs the API key when one is set


class Gate:
    """ASGI middleware in front of the app: the API key, then the body-size cap (read before routing)."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, body_timeout_s: float = 30.0):
        self.app, self.max_body, self.body_timeout = app, max_body_bytes, body_timeout_s
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.key):
                why = "missing API key" if not given else "invalid API key"
                denied = error_response(401, f"{why}: send 'Authorization: Bearer <key>'",
                                        headers={"WWW-Authenticate": "Bearer"})
                return await denied(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await error_response(400, "bad Content-Length header")(scope, receive, send)
        too_large = error_response(413, f"request body larger than {self.max_body} bytes")
        if declared > self.max_body:
            return await too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the whole body here, so an undeclared (chunked) oversize body is refused too.
        # A client that stalls mid-body (fewer bytes than its Content-Length) gets 408 after body_timeout,
        # so it can hold neither a worker nor a graceful shutdown forever.
        received, size = bytearray(), 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                late = error_response(408, f"request body not received within {self.body_timeout:g} s")
                return await late(scope, receive, send)
            if message["type"] != "http.request":
                return  # the client left before sending its body
            received += message.get("body", b"")
            size = len(received)
            if size > self.max_body:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = [bytes(received)]
        del received
        # Bodies are JSON whatever Content-Type says (``curl -d`` sends form encoding, some clients none).
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")])

        async def replay():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)
