"""Zeroconf (mDNS) advertisement so Home Assistant discovers the servers.

Unlike the ``wyoming`` helper, this advertises the host's real interface
addresses (a service bound to 0.0.0.0 advertised as 0.0.0.0 is dropped by
Home Assistant), uses a stable, distinct name per service, and withdraws the
records on shutdown so Home Assistant is never pointed at a dead server.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence

import ifaddr
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from ..config import ZeroconfSettings

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."


def host_addresses(include_loopback: bool = False) -> list[str]:
    """Every usable IPv4/IPv6 address of this host's interfaces (no link-local v6)."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            address = ipaddress.ip_address(text.split("%")[0])
            if address.is_loopback and not include_loopback:
                continue
            if address.is_link_local or address.is_unspecified or address.is_multicast:
                continue
            found.append(str(address))
    return sorted(set(found), key=lambda a: (":" in a, a))


def service_name(settings: ZeroconfSettings, service: str) -> str:
    prefix = settings.name or f"superwhisper-{{service}}-{socket.gethostname().split('.')[0]}"
    name = prefix.replace("{service}", service) if "{service}" in prefix else f"{prefix}-{service}"
    return name[:63]


class Discovery:
    def __init__(self, settings: ZeroconfSettings, *, interfaces: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.interfaces = interfaces
        self._zeroconf: AsyncZeroconf | None = None
        self.infos: list[AsyncServiceInfo] = []

    async def register(self, services: Sequence[tuple[str, int]]) -> None:
        addresses = list(self.settings.addresses) or host_addresses()
        if not addresses:
            _LOGGER.warning("zeroconf: no routable address on this host, not advertising")
            return
        packed = [ipaddress.ip_address(a).packed for a in addresses]
        self._zeroconf = AsyncZeroconf(
            ip_version=IPVersion.All,
            interfaces=list(self.interfaces) if self.interfaces else list(addresses),
        )
        for service, port in services:
            name = service_name(self.settings, service)
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{name}.{SERVICE_TYPE}",
                addresses=packed,
                port=port,
                properties={"service": service},
                server=f"{name}.local.",
            )
            # The call returns the announcement task; awaiting it means the records are out.
            announced = await self._zeroconf.async_register_service(info)
            await announced
            self.infos.append(info)
            _LOGGER.info("zeroconf: advertised %s on %s port %d", name, ", ".join(addresses), port)

    async def close(self) -> None:
        if self._zeroconf is None:
            return
        for info in self.infos:
            # Await the goodbye broadcast before the sockets close, or Home Assistant keeps
            # stale records pointing at a server that is gone.
            goodbye = await self._zeroconf.async_unregister_service(info)
            await goodbye
        await self._zeroconf.async_close()
        self._zeroconf = None
        self.infos = []
