"""Which addresses `prefalign serve` binds without a key: loopback only (kept free of heavy imports, so
the refusal comes before torch loads)."""

from __future__ import annotations

from ..errors import ConfigError
from ..runtime.http import check_api_key, is_loopback


def check_host(host: str, api_key: str | None) -> None:
    check_api_key(api_key)
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} is not a loopback address: serving it needs --api-key KEY (or the "
                          "PREFALIGN_API_KEY environment variable); every route but /health then checks the key")
