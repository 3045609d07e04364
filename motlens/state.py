"""The one local state directory used by every component on embedded defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from motlens.envsource import SettingPath


class StateSettings(BaseSettings):
    """Where embedded defaults live (``MOTLENS_HOME``, default ``./.motlens``)."""

    # an empty MOTLENS_HOME= is unset (./.motlens), not the working directory
    model_config = SettingsConfigDict(env_prefix="MOTLENS_", extra="ignore", env_ignore_empty=True)

    home: SettingPath = Field(default=Path(".motlens"))

    @property
    def mlflow_uri(self) -> str:
        """Local MLflow tracking/registry URI (sqlite; the file store is refused by MLflow 3.13+)."""
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifacts(self) -> Path:
        return (self.home / "mlartifacts").resolve()

    @property
    def predlog_dir(self) -> Path:
        return (self.home / "predlog").resolve()

    def ensure(self) -> StateSettings:
        self.home.mkdir(parents=True, exist_ok=True)
        return self
