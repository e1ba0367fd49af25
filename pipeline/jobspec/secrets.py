"""Secrets never leave the process in clear: values of secret-named environment variables that a spec
interpolates (``${AWS_SECRET_ACCESS_KEY}``, ``${MINIO_PASSWORD}``, ...) are remembered here when the spec
is loaded, and every path a value can take out of the process (error messages, log lines, tracebacks,
saved specs) goes through `redact`, which puts ``${NAME}`` back in their place. Passwords written into
URLs (``scheme://user:password@host``) are hidden whatever their source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|PASSWD|PASS|CREDENTIALS?)(_|$)", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)(?P<password>(?!\$\{)[^/\s@]+)(?=@)")

_remembered: dict[str, str] = {}  # secret value -> "${NAME}", for this process


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def remember(value: str, placeholder: str) -> None:
    if value:
        _remembered[value] = placeholder


def redact(text: str, secrets: Mapping[str, str] | None = None, url_passwords: bool = True) -> str:
    """``text`` with every known secret (this process's, and ``secrets``) put back as ``${NAME}``, and every
    other password written into a URL shown as ``***`` (not in saved specs: they must load back)."""
    known = {**_remembered, **(secrets or {})}
    for value, placeholder in sorted(known.items(), key=lambda kv: -len(kv[0])):
        if value:
            text = text.replace(value, placeholder)
    return URL_PASSWORD.sub(lambda m: m.group("head") + "***", text) if url_passwords else text
