"""The server's door: everything checked before a request is parsed or routed.

A pure ASGI middleware, in this order:
  - the request head: at most ``max_header_bytes`` of headers (431), at most one Authorization
    header (400), a Host the server answers to (421: on a loopback address only loopback names,
    unless ``allowed_hosts`` says otherwise, so a DNS-rebinding page cannot read the API);
  - the API key (401);
  - POST bodies: ``Content-Type: application/json`` (415, so that no web page can send a CORS
    "simple request": those are text/plain, form or multipart), a declared or received size over
    ``max_body_bytes`` (413), the whole body within ``body_timeout_s`` seconds of the request head
    (408), and all bodies being received at once within ``max_pending_body_bytes`` (503 with
    Retry-After past it).
The body is read here in full so that an oversize body is refused with 413 even when it is chunked
and declares no length; the app then gets it replayed, and later receive() calls (the disconnect
watch) go through to the connection.
"""
import asyncio
import hmac
import ipaddress
from typing import Optional, Sequence

from engine.serving.protocol import error_response

OPEN_PATHS = frozenset({"/health"})  # everything else needs the API key when one is set
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1", "[::1]"})
BODY_METHODS = ("POST", "PUT", "PATCH")


def is_loopback(address: Optional[str]) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: bytes) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "[::1]", "a.b:80" -> "a.b")."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[:text.find("]") + 1] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def is_json(content_type: bytes) -> bool:
    """application/json or application/<something>+json, with any parameters (charset)."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class Gate:
    """ASGI middleware in front of the app (see the module docstring for what it checks)."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, body_timeout_s: float = 30.0,
                 max_header_bytes: int = 64 << 10, max_pending_body_bytes: int = 256 << 20,
                 allowed_hosts: Optional[Sequence[str]] = None, retry_after_s: int = 1):
        self.app, self.max_body, self.body_timeout = app, max_body_bytes, body_timeout_s
        self.key = api_key.encode() if api_key else None
        self.max_header, self.max_pending, self.retry_after = max_header_bytes, max_pending_body_bytes, retry_after_s
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.strip().lower() for h in allowed_hosts)
        self.pending = 0  # bytes of the bodies being received now (touched only on the event loop)

    def host_allowed(self, scope, host: Optional[bytes]) -> bool:
        if self.allowed_hosts is not None and "*" in self.allowed_hosts:
            return True
        name = host_name(host) if host is not None else None
        if self.allowed_hosts is not None:
            return name in self.allowed_hosts
        server = scope.get("server")
        if not is_loopback(server[0] if server else None):
            return True  # bound to a public address: any name (say --allowed-hosts to restrict it)
        return name is not None and (name in LOOPBACK_NAMES or is_loopback(name))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def refuse(status, message, headers=None):
            return await error_response(status, message, headers=headers)(scope, receive, send)

        raw = scope["headers"]
        if sum(len(k) + len(v) + 4 for k, v in raw) > self.max_header:
            return await refuse(431, f"request headers larger than {self.max_header} bytes")
        headers = dict(raw)
        if sum(1 for k, _ in raw if k == b"authorization") > 1:
            return await refuse(400, "more than one Authorization header")
        if not self.host_allowed(scope, headers.get(b"host")):
            host = headers.get(b"host", b"").decode("latin-1")[:100]
            return await refuse(421, f"Host {host!r} is not served here (a loopback server answers to loopback "
                                     f"names; list others with --allowed-hosts)")
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.key):
                why = "missing API key" if not given else "invalid API key"
                return await refuse(401, f"{why}: send 'Authorization: Bearer <key>'",
                                    headers={"WWW-Authenticate": "Bearer"})
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await refuse(400, "bad Content-Length header")
        if declared > self.max_body:
            return await refuse(413, f"request body larger than {self.max_body} bytes")
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        if not is_json(headers.get(b"content-type", b"")):
            given = headers.get(b"content-type", b"").decode("latin-1")[:100] or "none"
            return await refuse(415, f"Content-Type must be application/json (got {given})")
        # Read the whole body here, so an undeclared (chunked) oversize body is refused too. The body
        # has one deadline, so a client dripping bytes can hold neither a worker nor a shutdown.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received, counted = bytearray(), 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    return await refuse(408, f"request body not received within {self.body_timeout:g} s "
                                             f"(--body-timeout)")
                if message["type"] != "http.request":
                    return  # the client left before sending its body
                chunk = message.get("body", b"")
                received += chunk
                self.pending += len(chunk)
                counted += len(chunk)
                if len(received) > self.max_body:
                    return await refuse(413, f"request body larger than {self.max_body} bytes")
                if self.pending > self.max_pending:
                    return await refuse(503, f"server busy: more than {self.max_pending} bytes of request bodies "
                                             f"being received; retry later",
                                        headers={"Retry-After": str(self.retry_after)})
                if not message.get("more_body", False):
                    break
        finally:
            self.pending -= counted
        body = [bytes(received)]
        del received

        async def replay():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)
