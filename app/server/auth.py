"""API keys (Bearer header or `?token=`, since browsers cannot set WebSocket headers) and the Origin allow-list."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence


def presented_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    token = query.get("token")
    return token or None


def is_authorized(api_keys: Sequence[str], headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
    """True when no keys are configured, or the request presents one of them (compared in constant time)."""
    if not api_keys:
        return True
    key = presented_key(headers, query)
    if key is None:
        return False
    return any(hmac.compare_digest(key.encode(), allowed.encode()) for allowed in api_keys)


def is_origin_allowed(allowed_origins: Sequence[str], headers: Mapping[str, str]) -> bool:
    """True when no allow-list is configured, the request has no Origin (not a browser), or it is listed."""
    if not allowed_origins:
        return True
    origin = headers.get("origin")
    return origin is None or origin in allowed_origins or "*" in allowed_origins
