"""The ops HTTP server (aiohttp): /metrics, /healthz, /readyz, /status.

One per process, whatever services it runs. ``/readyz`` is what systemd,
Kubernetes and the add-on watchdog poll: 503 with the reason in JSON while a
model is loading or when a chain has no healthy level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..config import as_dict

if TYPE_CHECKING:
    from .server import ServiceContext, WyomingService

_LOGGER = logging.getLogger(__name__)

SECRET_KEYS = ("token", "api_key", "password", "secret")


def redact(value: Any) -> Any:
    """Replace secrets (tokens, API keys) anywhere in a settings tree with '***'."""
    if isinstance(value, dict):
        return {key: ("***" if value_is_secret(key, item) else redact(item)) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def value_is_secret(key: Any, item: Any) -> bool:
    return isinstance(key, str) and any(s in key.lower() for s in SECRET_KEYS) and bool(item)


class OpsServer:
    def __init__(
        self,
        services: Sequence[WyomingService],
        context: ServiceContext,
        *,
        listening: Callable[[], bool] | None = None,
    ) -> None:
        self.services = services
        self.context = context
        self.listening = listening
        """True once the Wyoming ports accept connections (the runtime's); None: not checked.
        A service is ready after its warm-up, but its port opens only once every service
        has answered its smoke request: /readyz must not send a client to a closed port."""
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        settings_json = json.dumps(as_dict(context.settings), sort_keys=True, default=str)
        self.config_digest = hashlib.sha256(settings_json.encode()).hexdigest()[:16]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/status", self.status)
        return app

    async def start(self) -> None:
        settings = self.context.settings.metrics
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.host, settings.port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only here
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        _LOGGER.info("ops HTTP on %s:%s (/metrics /healthz /readyz /status)", settings.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def metrics(self, request: web.Request) -> web.Response:
        for service in self.services:
            ready, _ = service.readiness()
            self.context.metrics.ready.labels(service.name).set(1 if ready else 0)
        body = generate_latest(self.context.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True, "uptime_s": round(time.time() - self.started, 1)})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = {}
        if self.listening is not None and not self.listening():
            reasons["runtime"] = "starting: the Wyoming servers are not listening yet"
        for service in self.services:
            ready, reason = service.readiness()
            if not ready:
                reasons[service.name] = reason
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        return web.json_response({"ready": True})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "version": __version__,
                "uptime_s": round(time.time() - self.started, 1),
                "config_digest": self.config_digest,
                "gpu": self.context.gpu.as_dict(),
                "services": [service.status() for service in self.services],
                "settings": redact(as_dict(self.context.settings)),
            },
            dumps=lambda data: json.dumps(data, default=str),
        )
