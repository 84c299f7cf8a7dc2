"""POST /admin/workers/{name}/role on the router: switch a worker's role (serve/admin.py), authenticated
like POST /admin/workers (the router's API key)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.serve.admin import SWITCH_GRACE_S
from pdserve.serve.protocol import APIError


def add_admin_routes(app: FastAPI, front: Any) -> None:
    """POST /admin/workers/{name}/role {"role": ..., "grace_s": ...}: switch a worker's role
    (the front's `_auth`, `_body` and `_error` give it the API's authentication, limits and errors)."""
    @app.post("/admin/workers/{name}/role")
    async def switch_role(name: str, request: Request) -> Response:
        try:
            front._auth(request)
            body = await front._body(request)
            if not isinstance(body, dict) or not isinstance(body.get("role"), str):
                raise APIError("body must be {\"role\": \"prefill\" | \"decode\" | \"colocated\"}")
            grace = body.get("grace_s", SWITCH_GRACE_S)
            if not isinstance(grace, int | float) or isinstance(grace, bool) or grace < 0:
                raise APIError("grace_s must be a number of seconds >= 0")
            try:
                await front.backend.switch_role(name, body["role"], grace_s=float(grace))
            except ValueError as e:
                raise APIError(str(e), status=404 if "no worker named" in str(e) else 400) from None
            except (TimeoutError, RuntimeError, ConnectionError) as e:
                raise APIError(str(e), status=503, type_="server_error") from None
        except APIError as e:
            return front._error(e)
        w = next(w for w in front.backend.workers if w.name == name)
        return JSONResponse({"worker": name, "role": w.role, "up": w.healthy})
