"""Credentials kept out of URLs, messages and logs."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:  # the CLI's logging imports this module: pydantic only where tokens are checked
    from pydantic import SecretStr

#: query-string keys that clickhouse-connect (and most HTTP clients) take as credentials
_SECRET_KEYS = {"password", "passwd", "pwd", "access_token", "token", "secret"}


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it removed (``//user:password@host`` → ``//host``,
    up to the URL's last ``@`` even where the password holds one, or a ``/``, ``?`` or ``#``; the value
    of a credential query parameter, ``?token=…`` → ``?token=***``), the ``user:password@`` of a URL
    written without its scheme (``admin:pw@host:5000`` → ``host:5000``), and any ``Bearer``/``Basic``
    credential (an HTTP library's error may quote the header it refused)."""
    text = _SCHEMELESS_USER.sub("", re.sub(r"//\S*@", "//", text))
    return _AUTH.sub(r"\1 ***", _QUERY_SECRET.sub(r"\1***", text))


#: ``user:password@`` opening a word, up to the word's last ``@`` (a password may hold one, or a ``/``);
#: not after ``//`` (handled first), nor with a ``/`` right after the colon: a path, as in ``models:/NAME@ALIAS``
_SCHEMELESS_USER = re.compile(r"(?<![\w./:%+~-])[\w.%+~-]+:(?!/)[^\s'\"]*@(?=[\w\[])")
_AUTH = re.compile(r"\b(Bearer|Basic)\s+[^\s'\"]+", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"([?&;](?:" + "|".join(_SECRET_KEYS) + r")=)[^&;#\s'\"]*", re.IGNORECASE)


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


def pushgateway_url(url: str | None) -> str | None:
    """A Pushgateway URL without credentials: HTTP libraries quote a malformed one in their errors
    (``user:password@host`` read as a port), and those reach logs, outputs and the drift report."""
    if url and has_credentials(url):
        raise ValueError(
            "credentials in the Pushgateway URL are refused (errors would quote them): "
            "push through a network path that needs none, or an authenticating proxy beside the job"
        )
    return url


def bearer_token(token: SecretStr | None, variable: str) -> SecretStr | None:
    """A bearer token as an HTTP header can carry it: surrounding whitespace (a Secret written from a
    file with its newline) stripped; whitespace or a control character inside refused."""
    from pydantic import SecretStr

    if token is None:
        return None
    value = token.get_secret_value().strip()
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{variable} holds whitespace or a control character, which no HTTP header carries")
    return SecretStr(value)


class RedactingFormatter(logging.Formatter):
    """Log lines with URL credentials removed (:func:`redact`), tracebacks included: a library's error
    may quote a URL as configured, ``MLFLOW_TRACKING_URI=http://user:password@…`` say."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
