"""Where the load goes: an OpenAI-compatible server (vLLM, SGLang, the sim engine).

Headers may carry credentials (``Authorization: Bearer ...``). Their values are sent on the wire and
nowhere else: ``repr``/``str`` and :meth:`Endpoint.describe` (what results and logs store) show header
names only, and strip user-info and query strings from the URL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

API_PATHS = {"completions": "/completions", "chat": "/chat/completions"}


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(repr=False)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str  # the served model name, sent as "model"
    api: Literal["completions", "chat"] = "completions"
    headers: dict[str, str] = field(default_factory=dict)
    request_timeout_s: float = 600
    # Merged into every request body: sampling parameters or engine-specific fields (e.g. temperature).
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api not in API_PATHS:
            raise ValueError(f"api must be one of {sorted(API_PATHS)}, got {self.api!r}")
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must start with http:// or https://, got {_redact_url(self.base_url)!r}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return base + API_PATHS[self.api]

    def describe(self) -> dict[str, Any]:
        """What is safe to store and print: no header values, no URL credentials or query."""
        return {
            "base_url": _redact_url(self.base_url),
            "model": self.model,
            "api": self.api,
            "header_names": sorted(self.headers),
            "extra_body_keys": sorted(self.extra_body),
            "request_timeout_s": self.request_timeout_s,
        }

    def __repr__(self) -> str:
        headers = {k: "***" for k in self.headers}
        return (f"Endpoint(base_url={_redact_url(self.base_url)!r}, model={self.model!r}, api={self.api!r}, "
                f"headers={headers!r}, request_timeout_s={self.request_timeout_s!r})")

    __str__ = __repr__
