"""What personal data looks like in logs and stored events (the privacy policy, as pure functions).

- Client IPs: the last IPv4 octet / everything beyond the IPv6 /48 is zeroed, unless the operator opts out
  (`logging.mask_client_ips = false`, e.g. for an abuse investigation with a legal basis).
- Recipients in logs: the address, or with `logging.pseudonymise_recipients` a keyed HMAC per tenant
  ("r:3f1c…"), so log lines can still be correlated for one person without naming them, and one tenant's
  pseudonyms reveal nothing about another tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from mtad.policy.ip_privacy import mask_ip


@dataclass(frozen=True)
class LogPrivacy:
    mask_client_ips: bool = True
    pseudonymise_recipients: bool = False
    key: bytes = b""

    def client_ip(self, address: str | None) -> str | None:
        return mask_ip(address) if self.mask_client_ips else address

    def recipient(self, tenant_id: int, address: str) -> str:
        if not self.pseudonymise_recipients:
            return address
        digest = hmac.new(self.key, f"{tenant_id}|{address.lower()}".encode(), hashlib.sha256).hexdigest()
        return "r:" + digest[:16]
