"""Errors as one line for an operator: settings problems by the variable set, credentials removed.

Imports nothing heavy: an exception's library is only consulted when it is already loaded.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from motlens.credentials import redact

log = logging.getLogger(__name__)

EXIT_ERROR = 2
#: clickhouse-connect's transport failure: "Error ... executing HTTP request attempt N (URL)"
_URL_AT_END = re.compile(r"\((https?://[^\s)]+)\)\s*$")
#: the error name ClickHouse ends its message with, e.g. "(UNKNOWN_IDENTIFIER)" or "(UNKNOWN_IDENTIFIER) (version 25.8)"
_ERROR_NAME = re.compile(r"\s*\([A-Z][A-Z0-9_]+\)(\s*\(version [^)]*\))?\.?$")


def validation_problems(e: Any, flags: Mapping[str, str] | None = None) -> list[str]:
    """One ``NAME: message`` per problem of a pydantic ``ValidationError``: NAME is the flag the value
    came from (``flags``: field → flag, for the fields a command line set), else the environment
    variable where one is set, else the field; input values are never shown."""
    cls = _settings_class(e.title)
    out = []
    for err in e.errors(include_input=False, include_url=False):
        loc = [str(part) for part in err["loc"]]
        msg = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
        if loc and flags and loc[0] in flags:
            loc[0] = flags[loc[0]]
        elif loc and cls is not None:
            loc[0] = env_name(cls, loc[0]) or loc[0]
        out.append(redact(f"{'.'.join(loc)}: {msg}" if loc else msg))
    return out


def describe(e: BaseException) -> str:
    """``e`` on one line without credentials: settings problems joined with ``;``, an unreachable
    ClickHouse server by URL and reason, anything else as ``Type: first line of the message``."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(e, pydantic.ValidationError):
        return "; ".join(validation_problems(e))
    ch = sys.modules.get("clickhouse_connect.driver.exceptions")
    if ch is not None and isinstance(e, ch.OperationalError) and (url := _URL_AT_END.search(str(e))):
        return redact(f"cannot reach ClickHouse at {url.group(1)}: {_root_cause(e)}")
    if ch is not None and isinstance(e, ch.DatabaseError):
        return redact(f"ClickHouse: {server_message(e)}")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return redact(f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)


def server_message(e: BaseException) -> str:
    """ClickHouse's own line of a DatabaseError, without the code prefix and the rewritten query
    (``In scope ...``): ``Unknown expression identifier `x` (UNKNOWN_IDENTIFIER)``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = next((x for x in lines if "DB::Exception:" in x), lines[0]).split("DB::Exception:", 1)[-1].strip()
    name = _ERROR_NAME.search(line)
    text = line.split(". In scope ", 1)[0].removesuffix(name.group(0) if name else "").rstrip(" .")
    return f"{text} {name.group(0).strip()}" if name else text


def report_settings(prefix: str, e: Any, flags: Mapping[str, str] | None = None) -> int:
    """Print each problem of a settings ``ValidationError`` on its own line (``PREFIX: bad setting: NAME:
    message``, see :func:`validation_problems`); exit 2."""
    for problem in validation_problems(e, flags):
        print(f"{prefix}: bad setting: {problem}", file=sys.stderr)
    return EXIT_ERROR


def flag_names(fields: Iterable[str]) -> dict[str, str]:
    """field → its flag as argparse spells it by default (``max_rows`` → ``--max-rows``)."""
    return {f: "--" + f.replace("_", "-") for f in fields}


def report(prefix: str, e: BaseException) -> int:
    """Print ``e`` after ``prefix`` (a line per settings problem; the traceback only at -v); exit 2."""
    log.debug("%s failed", prefix, exc_info=e)
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(e, pydantic.ValidationError):
        return report_settings(prefix, e)
    print(f"{prefix}: {describe(e)} (-v for details)", file=sys.stderr)
    return EXIT_ERROR


def _root_cause(e: BaseException) -> str:
    while (nxt := e.__cause__ or e.__context__) is not None:
        e = nxt
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _settings_class(title: str) -> Any:
    """The loaded pydantic-settings class of that name (a ValidationError knows only the name)."""
    base = getattr(sys.modules.get("pydantic_settings"), "BaseSettings", None)
    todo = [base] if base is not None else []
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def env_names(cls: Any) -> dict[str, list[str]]:
    """Each field of settings class ``cls`` → the environment variables that set it (its aliases, else
    the env prefix + the field name)."""
    from pydantic import AliasChoices

    out = {}
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else []
        out[name] = [c for c in choices if isinstance(c, str)] or [cls.model_config.get("env_prefix", "") + name]
    return out


def env_name(cls: Any, key: str) -> str | None:
    """The environment variable (as set) that fed field ``key`` (its name or an alias) of ``cls``."""
    for name, candidates in env_names(cls).items():
        if key != name and key not in candidates:
            continue
        present = {k.upper(): k for k in os.environ}
        return next((present[c.upper()] for c in candidates if c.upper() in present), None)
    return None
