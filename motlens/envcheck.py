"""``MOTLENS_*`` environment variables that no setting reads, and the unprefixed names older releases
read: a typo or a renamed setting would otherwise leave the default in force without a word (``motlens``
warns at start; values never shown)."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
from collections.abc import Mapping

from motlens.errors import env_names

#: env prefix → the settings class that reads it, imported only when a variable needs it
SETTINGS = {
    "MOTLENS_SERVE_": "predictor.settings:ServeSettings",
    "MOTLENS_PREDLOG_": "predlog.settings:PredlogSettings",
    "MOTLENS_DRIFT_": "drift.settings:DriftSettings",
    "MOTLENS_PROMOTE_": "promotion.settings:PromoteSettings",
    "MOTLENS_DATA_": "training.chload:DataSettings",
    "MOTLENS_TRAIN_": "training.train:TrainSettings",
}
#: read outside those prefixes: the state directory and how many unused bundles its model cache keeps, the
#: embedder's model directory (tests, the GPU check) and the ClickHouse URL/password that the prediction log
#: and the data loader share
OTHER = frozenset(
    {
        "MOTLENS_HOME",
        "MOTLENS_MODEL_CACHE_KEEP",
        "MOTLENS_EMBEDDER_DIR",
        "MOTLENS_CLICKHOUSE_URL",
        "MOTLENS_CLICKHOUSE_PASSWORD",
    }
)
#: unprefixed names that releases before 3201d46 also read (in any case) for the prediction log, and the
#: names that replace them: set alone now, they configure nothing (the log falls back to the embedded one).
#: They may belong to other programs, so they are warned about, never refused.
RETIRED = {
    "CLICKHOUSE_URL": ("MOTLENS_CLICKHOUSE_URL", "MOTLENS_PREDLOG_CLICKHOUSE_URL"),
    "PASSWORD": ("MOTLENS_CLICKHOUSE_PASSWORD", "MOTLENS_PREDLOG_PASSWORD"),
}
#: what Kubernetes sets in every pod for each Service of its namespace (service links): a Service named
#: ``motlens-clickhouse`` gives ``MOTLENS_CLICKHOUSE_SERVICE_HOST``, ``…_PORT_8123_TCP_ADDR`` and the like
#: (``…_PORT`` alone only with its ``tcp://…`` value: a setting's typo may end in ``_PORT`` too)
SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT(_[A-Z0-9_]+)?)$|_PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?$")
_LINK_URL = re.compile(r"^(tcp|udp|sctp)://")


def _service_link(name: str, value: str) -> bool:
    upper = name.upper()
    return bool(SERVICE_LINK.search(upper) or (upper.endswith("_PORT") and _LINK_URL.match(value)))


def _names(target: str) -> set[str]:
    module, cls = target.split(":")
    return {n.upper() for names in env_names(getattr(importlib.import_module(module), cls)).values() for n in names}


def unknown_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Each set ``MOTLENS_*`` variable that no setting reads, with the closest known name (or None).

    A prefix whose settings cannot be imported (its extra is not installed) is not checked: the
    command that needs it says what to install. Kubernetes service-link variables are not settings
    (:data:`SERVICE_LINK`).
    """
    env = os.environ if environ is None else environ
    names = sorted(k for k, v in env.items() if k.upper().startswith("MOTLENS_") and not _service_link(k, v))
    known, unchecked, loaded = set(OTHER), set(), set()

    def load(prefixes: list[str]) -> None:
        for prefix in prefixes:
            if prefix in loaded:
                continue
            loaded.add(prefix)
            try:
                known.update(_names(SETTINGS[prefix]))
            except ImportError:
                unchecked.add(prefix)

    load([p for p in SETTINGS if any(n.upper().startswith(p) for n in names)])
    out = []
    for name in names:
        upper = name.upper()
        if upper in known or any(upper.startswith(p) for p in unchecked):
            continue
        load(list(SETTINGS))  # an unknown name: every setting, for the closest match
        if upper in known:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
        out.append((name, close[0] if close else None))
    return out


def retired_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Each set :data:`RETIRED` name (as spelt) whose replacements are all unset, with the one to set.

    ``PASSWORD`` counts only beside a ClickHouse URL (old or new name): without one an older release
    had no use for it either."""
    env = os.environ if environ is None else environ
    upper = {k.upper(): k for k, v in env.items() if v}
    out = []
    for old, new in RETIRED.items():
        if old not in upper or any(n in upper for n in new):
            continue
        if old == "PASSWORD" and not any(n in upper for n in ("CLICKHOUSE_URL", *RETIRED["CLICKHOUSE_URL"])):
            continue
        out.append((upper[old], new[0]))
    return out


def warn_unknown_env() -> None:
    """Log a warning per :func:`unknown_env` and :func:`retired_env` name (names only, never values)."""
    logger = logging.getLogger("motlens")
    for name, close in unknown_env():
        hint = f" (did you mean {close}?)" if close else ""
        logger.warning("%s is set but no motlens setting reads it%s", name, hint)
    for name, new in retired_env():
        what = "the prediction log is the embedded one" if new.endswith("_URL") else "no ClickHouse password is sent"
        logger.warning(
            "%s is set but motlens reads only %s (older releases read %s too): %s; if %s is meant for motlens, "
            "set %s", name, new, name, what, name, new,
        )  # fmt: skip
