"""Request body size limit (ASGI middleware) and the optional API key."""

from __future__ import annotations

import json
import secrets

from fastapi import Request

from flexllm.worker.api.errors import APIError, error_body

DRAIN_LIMIT_BYTES = 64 << 20  # read (and drop) at most this much of an oversized body before answering


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answers 413 (OpenAI error JSON) to bodies over ``max_bytes``, by Content-Length or as they stream in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._drain(receive, int(length))
            await self._reject(send)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send)

    @staticmethod
    async def _drain(receive, length: int) -> None:
        """Read the body the client is sending so it sees our answer instead of a reset connection."""
        read = 0
        while read < min(length, DRAIN_LIMIT_BYTES):
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _reject(self, send) -> None:
        body = json.dumps(error_body(413, f"request body exceeds {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def require_api_key(api_key: str | None):
    """A FastAPI dependency: ``Authorization: Bearer <api_key>`` when a key is configured."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    return check
