"""Credentials kept out of URLs, messages and logs."""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qs, urlsplit

#: query-string keys that clickhouse-connect (and most HTTP clients) take as credentials
_SECRET_KEYS = {"password", "passwd", "pwd", "access_token", "token", "secret"}


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it removed (``//user:password@host`` → ``//host``,
    up to the URL's last ``@`` even where the password holds one, or a ``/``, ``?`` or ``#``), and
    any ``Bearer``/``Basic`` credential (an HTTP library's error may quote the header it refused)."""
    return _AUTH.sub(r"\1 ***", re.sub(r"//\S*@", "//", text))


_AUTH = re.compile(r"\b(Bearer|Basic)\s+[^\s'\"]+", re.IGNORECASE)


def _secret_in_query(query: str) -> bool:
    return bool(_SECRET_KEYS & {k.lower() for k in parse_qs(query, keep_blank_values=True)})


def no_password_in_url(url: str | None) -> str | None:
    """``url`` (None for empty), refused when it carries a password, in its user part or its query
    string: that goes in MOTLENS_CLICKHOUSE_PASSWORD."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.password or _secret_in_query(parts.query):
        raise ValueError("put the ClickHouse password in MOTLENS_CLICKHOUSE_PASSWORD, not in the URL")
    if "@" in url.partition("//")[2] and "@" not in parts.netloc:  # a user part cut short by / ? or #
        raise ValueError(
            "an '@' after the host: a user:password part holding '/', '?' or '#'? Put the ClickHouse password "
            "in MOTLENS_CLICKHOUSE_PASSWORD, not in the URL (elsewhere write '@' as %40)"
        )
    return url


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a user part (``user@``, ``user:password@``) or a secret query key."""
    parts = urlsplit(url)
    return "@" in parts.netloc or _secret_in_query(parts.query)


class RedactingFormatter(logging.Formatter):
    """Log lines with URL credentials removed (:func:`redact`), tracebacks included: a library's error
    may quote a URL as configured, ``MLFLOW_TRACKING_URI=http://user:password@…`` say."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
