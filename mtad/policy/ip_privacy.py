"""Client IP addresses as mtad keeps them: the last IPv4 octet zeroed (/24), IPv6 cut to its /48.

The privacy policy promises that the last octet of IP addresses is masked wherever mtad stores or logs them.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache


@lru_cache(maxsize=4096)  # a client submits many messages: ipaddress parsing was ~1 % of the event loop
def mask_ip(address: str | None) -> str | None:
    """'192.0.2.77' -> '192.0.2.0'; '2001:db8:1:2::5' -> '2001:db8:1::'; other text (a unix socket) unchanged."""
    if not address:
        return address
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)
