"""The one local state directory used by every component on embedded defaults."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from motlens.envsource import SettingPath

#: what the local registry's ``sqlite:///`` URI cannot carry in its path: SQLAlchemy reads ``?`` as the start
#: of the URI's query and decodes ``%XX``; percent-encoding them does not help, as MLflow creates the database's
#: directory from the path as written (a second, encoded directory). ``#``, spaces, a ``%`` before anything but
#: two hex digits and the rest open as written.
SQLITE_URI_UNSAFE = re.compile(r"\?|%[0-9A-Fa-f]{2}")


class StateSettings(BaseSettings):
    """Where embedded defaults live (``MOTLENS_HOME``, default ``./.motlens``)."""

    # an empty MOTLENS_HOME= is unset (./.motlens), not the working directory
    model_config = SettingsConfigDict(env_prefix="MOTLENS_", extra="ignore", env_ignore_empty=True)

    home: SettingPath = Field(default=Path(".motlens"))
    model_cache_keep: int = Field(
        default=3,
        ge=0,
        description="MOTLENS_MODEL_CACHE_KEEP: registry bundles kept in MOTLENS_HOME/models beyond those in use or "
        "named by an alias or a last-known-good record, most recently fetched first (training.registry)",
    )

    @property
    def mlflow_uri(self) -> str:
        """Local MLflow tracking/registry URI (sqlite; the file store is refused by MLflow 3.13+); ValueError
        for a home whose path holds what :data:`SQLITE_URI_UNSAFE` matches."""
        db = (self.home / "mlflow.db").resolve()
        if bad := SQLITE_URI_UNSAFE.search(str(db)):
            raise ValueError(
                f"MOTLENS_HOME: {db.parent} holds {bad.group(0)!r}, which the local registry's sqlite:/// URI cannot "
                "carry (the database would open elsewhere): use a home without it, or set MLFLOW_TRACKING_URI"
            )
        return f"sqlite:///{db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return (self.home / "mlartifacts").resolve()

    @property
    def predlog_dir(self) -> Path:
        return (self.home / "predlog").resolve()

    def ensure(self) -> StateSettings:
        self.home.mkdir(parents=True, exist_ok=True)
        return self
