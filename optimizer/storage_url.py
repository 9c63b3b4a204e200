"""The study's storage URL: a password only by ``${NAME}`` reference, expanded when the storage is opened.

A study file is copied into the run directory, shown in reports and shared; a password written into it
would travel with all of them. So ``postgresql://user:${PGPASSWORD}@host/db`` is the only way to give one,
and the expanded URL lives in memory only (messages show the reference, never the value).
"""
from __future__ import annotations

import os
from urllib.parse import quote, urlsplit

from servetune.optimizer.secret_refs import ENV_REF as _REF


class StorageUrlError(ValueError):
    pass


def _password(url: str) -> str | None:
    """The password part of ``scheme://user:password@host/...`` as written, or None."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    if "@" not in netloc:
        return None
    userinfo = netloc.rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


def literal_password_error(url: str) -> str | None:
    """Why this URL may not be written in a study file (a literal password), or None."""
    pw = _password(url)
    if pw is None or pw == "" or _REF.fullmatch(pw):
        return None
    scheme = url.split("://", 1)[0]
    return (f"the {scheme} URL holds a literal password; study files are copied into the run directory and "
            "reports, so give it by reference: user:${PGPASSWORD}@host (the variable is read when the study "
            "opens its storage)")


def expand(url: str) -> str:
    """The URL with each ``${NAME}`` replaced by that environment variable (URL-quoted); unset → error."""
    missing = [m.group(1) for m in _REF.finditer(url) if m.group(1) not in os.environ]
    if missing:
        raise StorageUrlError(f"storage: the URL refers to ${{{missing[0]}}}, which is not set in this "
                              "environment; export it before running the study")
    return _REF.sub(lambda m: quote(os.environ[m.group(1)], safe=""), url)


def shown(url: str) -> str:
    """The URL as it may be printed: references stay references, any other password is masked."""
    pw = _password(url)
    if pw is None or _REF.fullmatch(pw):
        return url
    return url.replace(f":{pw}@", ":***@", 1)
