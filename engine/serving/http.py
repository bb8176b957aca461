"""The HTTP/1.1 connection layer under the app: h11 with a header-size cap and a header deadline.

uvicorn's default parser (httptools, where installed) has no limit on header size and no timeout on
a request whose headers never end, and it drops the requests parsed before a malformed pipelined
one. h11 buffers at most ``max_header_bytes`` of an unfinished request head (past it: 400 and the
connection closes), answers pipelined requests one after another (a bad one is answered 400 after
the good ones before it, logged at warning level), and ``Protocol`` closes a connection whose
request head is not complete ``header_timeout_s`` seconds after it opened or after its last
response. Run the app with ``uvicorn.run(app, **uvicorn_options(config))``.
"""
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        # Still waiting for (the rest of) a request head: the client had its time.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's head has the same deadline

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def protocol_class(header_timeout_s: float) -> type:
    return type("Protocol", (Protocol,), {"header_timeout_s": float(header_timeout_s)})


def uvicorn_options(config, graceful_timeout_s: Optional[float] = None) -> dict:
    """The keyword arguments of ``uvicorn.run``/``uvicorn.Config`` that a ``ServerConfig`` implies."""
    options = {"http": protocol_class(config.header_timeout_s),
               "h11_max_incomplete_event_size": config.max_header_bytes}
    if graceful_timeout_s is not None:
        options["timeout_graceful_shutdown"] = graceful_timeout_s
    return options
