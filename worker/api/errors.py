"""Errors in the OpenAI JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLarge",
               429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError",
               504: "GatewayTimeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ERROR_TYPES.get(status, "Error")
        self.retry_after_s = retry_after_s  # sent as ``Retry-After``


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": code if code is not None else status}}


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return JSONResponse(error_body(error.status, error.message, error.param, error.code, error.kind),
                        status_code=error.status, headers=headers)


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error)


async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    first = problems[0] if problems else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in problems)
    return error_response(APIError(400, message or "invalid request", param=where))


async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    return error_response(APIError(error.status_code, str(error.detail)))


def install_error_handlers(app) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
