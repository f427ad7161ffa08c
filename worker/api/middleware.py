"""The outermost middleware: a request id on every response, the catch-all error handler, and the
request counter labelled by route template (never the raw path, so the series stay bounded)."""

from __future__ import annotations

import json
import logging
import uuid

from starlette.routing import BaseRoute, Match

from flexllm.worker.api.errors import error_body
from flexllm.worker.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
OTHER_ROUTE = "other"  # the endpoint label of every path that matches no route


def route_label(routes: list[BaseRoute], scope) -> str:
    """The path template of the route ``scope`` is for (also on a wrong method), else ``other``."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", OTHER_ROUTE)
    return OTHER_ROUTE


class RequestContext:
    """Gives every HTTP request an id (``x-request-id`` response header), answers an error nobody
    handled with a 500 in OpenAI's JSON shape that names the id (logged with the traceback), and
    counts requests by route template and status."""

    def __init__(self, app, metrics: Metrics, routes: list[BaseRoute]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        route = route_label(self.routes, scope)
        status, started = 0, False

        async def send_with_id(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope["method"], route)
            if not started:  # else the response is cut short: its client sees a broken stream
                body = error_body(500, f"internal error (request id {request_id}); it has been logged")
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        finally:
            self.metrics.requests.labels(route, str(status) if started else "none").inc()
