"""An environment source on which an empty variable is unset, save for the fields named; path settings
that refuse an empty flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource


class EmptyIsUnset(EnvSettingsSource):
    """``MOTLENS_PREDLOG_DIR=`` is the default, not the working directory; a flag's empty value is left
    to the field's own checks (it is not an environment value). The fields in ``keep`` take an empty
    variable as given, for their validators to refuse (an empty list of steps, an empty alias)."""

    def __init__(self, settings_cls: type[BaseSettings], keep: tuple[str, ...] = ()) -> None:
        super().__init__(settings_cls)
        self.keep = keep

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__call__().items() if v != "" or k in self.keep}


class EmptyIsUnsetSettings(BaseSettings):
    """Settings read from the environment through :class:`EmptyIsUnset`, keeping ``keep_empty``."""

    keep_empty: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = EmptyIsUnset(settings_cls, keep=cls.keep_empty)
        return init_settings, env, dotenv_settings, file_secret_settings


def no_empty_path(value: object) -> object:
    """A path setting given as an empty flag (a script's unset ``$DIR``) is refused: read as a path it
    is the working directory; an empty *variable* never gets here (it is unset)."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path: give one, or leave it unset for the default")
    return value


#: A path setting: an empty flag is refused (:func:`no_empty_path`).
SettingPath = Annotated[Path, BeforeValidator(no_empty_path)]
