"""Uvicorn's httptools protocol with deadlines for what uvicorn leaves unbounded.

Uvicorn times out an idle keep-alive connection only after a response: a connection that opens and
sends nothing, or sends a request's headers a byte at a time, is held for as long as the client
likes (slow loris). Here a fresh connection gets the keep-alive timeout before its first request, as
uvicorn gives one after each response, and every request's headers must be complete within
``header_timeout_s`` of their first byte; the body is bounded separately (``body_timeout_s``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from predictor import metrics

log = logging.getLogger(__name__)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that closes a connection idle before its first request, or whose
    request headers are not complete ``header_timeout_s`` after they began (counted as
    ``motlens_rejected_total{reason="header_timeout"}``). Subclassed per server by :func:`with_header_timeout`."""

    header_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.timeout_keep_alive, headers_begun=False)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s, headers_begun=True)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, *, headers_begun: bool) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, headers_begun)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, headers_begun: bool) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not headers_begun:  # idle before a first request: closed, as uvicorn closes an idle keep-alive
            self.transport.close()
            return
        metrics.REJECTED.labels(reason="header_timeout").inc()
        log.info("request headers from %s incomplete after %gs: 408", self.client, self.header_timeout_s)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # pipelined behind a response being written: close after that one
            return
        body = json.dumps({"error": f"request headers not complete within {self.header_timeout_s:g}s"}).encode()
        head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.transport.write(head.encode() + b"connection: close\r\n\r\n" + body)
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for one server (uvicorn instantiates ``config.http`` without arguments of ours)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": seconds})
