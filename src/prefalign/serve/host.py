"""Which addresses `prefalign serve` binds without a key: loopback only (kept free of heavy imports, so
the refusal comes before torch loads)."""

from __future__ import annotations

import ipaddress

from ..errors import ConfigError


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost` only: any other name could resolve to an exposed address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} is not a loopback address: serving it needs --api-key KEY (or the "
                          "PREFALIGN_API_KEY environment variable); every route but /health then checks the key")
