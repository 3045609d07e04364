"""MLflow registry helpers: register bundles, resolve aliases, fetch verified bundles.

Registered model ``mot-defects`` (docs/architecture.md "Registry and training runs"): aliases only
(``production``, ``canary``, ``candidate``), never stages. A version's ``source`` is the run
artifact directory ``model/``, which holds the bundle exactly as :mod:`motlens.bundle` writes it
(no MLmodel file, no pickle), so the same URI is what a KServe ``storageUri`` downloads to
``/mnt/models``.

Local default: tracking and registry in sqlite under ``MOTLENS_HOME`` with artifacts in
``MOTLENS_HOME/mlartifacts``; ``MLFLOW_TRACKING_URI`` points everything at a server instead.
Fetched bundles are cached in ``MOTLENS_HOME/models/<name>/<version>``; the last-known-good
records (which cached bundle a reference last served, docs/reliability.md) in ``models/.lkg/``.
Each download prunes the cache (:meth:`Registry.prune_cache`): a version goes only when no process
holds it (a shared ``flock`` on ``.<version>.lease`` beside it, kept while its fetched ``Bundle``
lives), no alias or last-known-good record names it, and ``MOTLENS_MODEL_CACHE_KEEP`` others were
used more recently.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from motlens import MODEL_NAME
from motlens.atomic import atomic_write
from motlens.bundle import MANIFEST, SHA256_PATTERN, Bundle, BundleError, set_manifest_fields, sha256_file
from motlens.credentials import redact
from motlens.state import StateSettings

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"
DEFAULT_EXPERIMENT = "mot-defects"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[0-9]+))/?$")
_NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})
MAX_VERSION = 2**31 - 1  # model versions are 32-bit integers in MLflow's stores
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_MLFLOW_ALIAS = re.compile(r"[\w-]{1,255}")  # mlflow.utils.validation's alias rule
#: what MLflow reserves as a version reference, not an alias (``latest`` aside)
_VERSION_ALIAS = re.compile(r"[vV]\d+")
_SHA256 = re.compile(SHA256_PATTERN)
#: a version number (``str.isdigit`` also takes digits such as '²', which ``int`` refuses)
_DIGITS = re.compile(r"[0-9]+")
#: a run id that may go into a search filter as a quoted literal (MLflow's are 32 hex digits)
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: model versions per registry search page
VERSIONS_PAGE = 1000
#: runs per search when listing versions
RUNS_BATCH = 100
LKG_DIR = ".lkg"
#: where a prune moves a cached version before deleting it (what a stopped prune left: deleted by the next)
PRUNED_PREFIX = ".pruned-"
#: Set when a version is created and deleted as registration's last step, once the stored
#: ``bundle.json`` names the version: a version still carrying it is never resolved.
INCOMPLETE_TAG = "motlens.registration"
#: model-version tag: the sha256 of the stored ``bundle.json`` (which holds every file's hash), set at
#: registration; a fetched bundle must match it, so rewriting the artifact store alone (a bundle
#: re-hashed into a manifest of its own) cannot swap the model a version serves
DIGEST_TAG = "motlens.bundle_sha256"
#: model-version tag: the sha256 of the run's stored held-out manifest (``training.heldout`` writes it
#: at :data:`HELDOUT_MANIFEST`, with its files' hashes), so the paired gate's texts are pinned as the
#: bundle is: write access to the artifact store cannot swap them
HELDOUT_DIGEST_TAG = "motlens.heldout_sha256"
HELDOUT_MANIFEST = "heldout/heldout.json"
#: model-version tag: when :meth:`Registry.pin` set :data:`DIGEST_TAG` after registration (a version
#: registered before the tag existed), so the trail tells a backfilled pin from one set at registration
PINNED_LATER_TAG = "motlens.bundle_sha256_pinned_at"
#: MLflow stores at most 36 characters of a dataset digest (``MAX_DATASET_DIGEST_SIZE``)
DATASET_DIGEST_CHARS = 36
INCOMPLETE = "incomplete"
#: tracking URI schemes of MLflow's SQLAlchemy store (``mlflow.store.db.db_types``), ``+driver`` aside
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# MLflow client settings for a tracking server, unless set in the environment (see _http_defaults)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


_IMPORT_LOCK = threading.Lock()


def _import_mlflow() -> None:
    """Import the MLflow modules this module uses, one thread at a time. Two threads of a fresh process
    importing MLflow at once (the predictor's loader and its alias follower) deadlock on its circular
    imports (``_ModuleLock('mlflow.protos.databricks_pb2')``) and leave ``mlflow`` half-initialised in
    ``sys.modules`` for good."""
    with _IMPORT_LOCK:
        import mlflow  # noqa: F401
        import mlflow.artifacts  # noqa: F401
        import mlflow.entities  # noqa: F401
        import mlflow.exceptions  # noqa: F401
        import mlflow.store.artifact.artifact_repository_registry  # noqa: F401


@dataclass(frozen=True)
class TrainingInput:
    """A run's training data as an MLflow dataset input (``run.inputs.dataset_inputs``): ``digest`` is
    the data hash (``data.sha256``; MLflow keeps its first 36 characters, ``profile`` the whole),
    ``source_type``/``source`` say where the data came from (never credentials)."""

    name: str
    sha256: str
    source_type: str
    source: dict[str, str]
    profile: dict[str, Any] = field(default_factory=dict)

    def entity(self) -> Any:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        return DatasetInput(
            Dataset(
                name=self.name,
                digest=self.sha256[:DATASET_DIGEST_CHARS],
                source_type=self.source_type,
                source=redact(json.dumps(self.source, sort_keys=True)),
                profile=json.dumps({"sha256": self.sha256, **self.profile}, sort_keys=True),
            ),
            tags=[InputTag("mlflow.data.context", "training")],
        )


class RegistryError(Exception):
    """A reference that does not resolve, or a registry operation that cannot be done."""


class RegistryUnreachable(RegistryError):
    """The registry did not answer (connection refused, DNS, timeout, repeated 5xx): it may come back."""


class UnknownModelRef(RegistryError):
    """The registry answered: no such version, or the alias is not set."""


class IncompleteVersion(UnknownModelRef):
    """The version's registration never finished (:data:`INCOMPLETE_TAG`): it is never served."""


@dataclass
class ModelVersionInfo:
    """One registered version of ``mot-defects`` with what the other components need."""

    name: str
    version: str
    run_id: str | None
    artifact_uri: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: datetime | None = None
    #: the run's params (strings, as MLflow stores them), e.g. ``split.seed`` / ``split.scheme`` for the
    #: offline gate's comparability check; not part of :meth:`to_json`
    params: dict[str, str] = field(default_factory=dict)

    @property
    def incomplete(self) -> bool:
        """Its registration did not finish (killed, or failed and not deleted): never served."""
        return self.tags.get(INCOMPLETE_TAG) == INCOMPLETE

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "artifact_uri": self.artifact_uri,
            "aliases": list(self.aliases),
            "tags": dict(self.tags),
            "metrics": dict(self.metrics),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "incomplete": self.incomplete,
        }


def _default_tracking_uri(state: StateSettings) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or state.mlflow_uri


class Registry:
    """The MLflow tracking server + model registry holding ``mot-defects``."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        model_name: str = MODEL_NAME,
        experiment: str = DEFAULT_EXPERIMENT,
        state: StateSettings | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.state = state or StateSettings()
        try:
            self.tracking_uri = tracking_uri or _default_tracking_uri(self.state)
        except ValueError as e:  # a home the local sqlite URI cannot carry
            raise RegistryError(f"bad setting: {e}") from e
        self.model_name = model_name
        self.experiment = experiment
        self.cache_dir = Path(cache_dir) if cache_dir else (self.state.home / "models").resolve()
        self._unpinned_warned: set[str] = set()  # versions without a digest tag, warned about once
        self._client: Any = None
        self._creating = False  # create_store: the client may migrate an empty sqlite file
        if self.tracking_uri.startswith(("http://", "https://")):
            _http_defaults()
        _import_mlflow()

    @property
    def client(self) -> Any:
        """The ``MlflowClient``, created on first use. A local sqlite database must exist already:
        only a write (:meth:`create_store` via :meth:`experiment_id` or :meth:`register_bundle`)
        creates one, so a mistyped URI fails instead of reading a new, empty registry."""
        if self._client is None:
            self.check_uri()
            path = self.sqlite_path
            if path is not None and not path.is_file():
                raise RegistryError(
                    redact(
                        f"registry {self.tracking_uri} does not exist (no file {path}): check the tracking "
                        "URI, or register a version first (motlens train)"
                    )
                )
            if path is not None and not self._creating and path.stat().st_size == 0:
                raise RegistryError(  # MLflow would write its schema into it, in a command that only reads
                    redact(
                        f"registry {self.tracking_uri} is an empty file, not an MLflow database: check the "
                        "tracking URI, or register a version first (motlens train)"
                    )
                )
            from mlflow import MlflowClient

            try:  # a sqlite store is opened (and its schema checked) here
                self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            except Exception as e:
                if _busy(e):
                    raise self._failure(e) from e
                raise
        return self._client

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a ``sqlite:///`` tracking URI (percent-decoded, as SQLAlchemy opens it);
        None for a server."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        return Path(unquote(self.tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]))

    @property
    def store_made(self) -> bool:
        """False only for a local sqlite store whose file does not exist yet (a registration makes it)."""
        path = self.sqlite_path
        return path is None or path.exists()

    def check_uri(self) -> None:
        """:class:`RegistryError` for a tracking URI no client of this install can open, whatever the
        registry's state: not a registry URI (a path, ``file://``), a database store without its packages
        (:meth:`check_store_support`), a scheme no MLflow registry store serves (:meth:`_check_scheme`), a
        ``sqlite:///`` path that is not a file. Asks no server."""
        uri = self.tracking_uri.lower()
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        # MLflow 3.13+ refuses its file store (a path, file://) with a maintenance notice; Databricks
        # URIs ("databricks", "databricks-uc") have no "://"
        if scheme in ("", "file") and not uri.startswith("databricks"):
            raise RegistryError(
                redact(
                    f"registry {self.tracking_uri}: not a registry URI; use sqlite:///PATH/mlflow.db or "
                    "http(s)://SERVER (MLflow no longer serves a file store)"
                )
            )
        self.check_store_support()  # before the scheme: without SQLAlchemy MLflow has no database stores
        self._check_scheme()
        self._check_sqlite_file()

    def _check_scheme(self) -> None:
        """:class:`RegistryError` for a URI scheme no MLflow registry store of this install serves
        (``bogus://``): MLflow's answer, INVALID_PARAMETER_VALUE, would read as "not found" below."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._model_registry.utils import _get_store_registry
        from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

        try:
            _get_store_registry().get_store_builder(self.tracking_uri)  # builds no store, asks no server
        except UnsupportedModelRegistryStoreURIException as e:
            schemes = ", ".join(s for s in e.supported_uri_schemes if s not in ("", "file"))
            raise RegistryError(
                redact(f"registry {self.tracking_uri}: no MLflow registry store serves this URI scheme ({schemes})")
            ) from e
        except MlflowException as e:  # a database scheme MLflow cannot parse ("postgresqlx://")
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RegistryError(redact(f"registry {self.tracking_uri}: {detail}")) from e

    def check_store_support(self) -> None:
        """:class:`RegistryError` with the install hint when a ``sqlite:///`` registry meets an install
        without MLflow's database store (also a ``postgresql://`` … one): the core requires only the client
        (``mlflow-skinny``, enough for a tracking server); the store is in the full ``mlflow`` (SQLAlchemy,
        alembic), the ``local`` extra. MLflow itself would answer "unsupported URI"."""
        if self.tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() not in DATABASE_SCHEMES:
            return
        try:
            for module in ("sqlalchemy", "alembic"):
                importlib.import_module(module)
        except ImportError as e:
            missing = (e.name or "sqlalchemy").split(".")[0]
            raise RegistryError(
                redact(
                    f"registry {self.tracking_uri} is an MLflow database store, which needs the full mlflow "
                    f"package ({missing} is not installed): pip install 'motlens[local]', or set "
                    "MLFLOW_TRACKING_URI to an MLflow server"
                )
            ) from e

    def _check_sqlite_file(self) -> None:
        """:class:`RegistryError` for a ``sqlite:///`` path that exists but is not a file (a directory)."""
        path = self.sqlite_path
        if path is not None and path.exists() and not path.is_file():
            raise RegistryError(
                redact(f"registry {self.tracking_uri}: {path} is not a file (a sqlite registry is one database file)")
            )

    def create_store(self) -> None:
        """Create a missing local sqlite store: its directory and the migrated, empty database."""
        path = self.sqlite_path
        self._check_sqlite_file()
        if path is None or (path.is_file() and path.stat().st_size > 0):
            return
        self.check_store_support()  # before the file: a store it cannot open is not created
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()  # MLflow migrates the empty file on first use (also one a killed creation left)
        except OSError as e:
            raise RegistryError(redact(f"cannot create registry {self.tracking_uri}: {e}")) from e
        self._creating = True
        try:
            with self._answering():
                self.client.search_registered_models(max_results=1)
        finally:
            self._creating = False

    # ---- runs and registration -------------------------------------------------------------

    def experiment_id(self) -> str:
        """The experiment runs are logged to (created on first use, with a missing local sqlite store;
        local artifacts under the state dir)."""
        self.create_store()
        with self._answering():
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                return str(exp.experiment_id)
            location = None
            if self.tracking_uri.startswith("sqlite:"):
                self.state.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
                location = self.state.mlflow_artifacts.as_uri()
            return str(self.client.create_experiment(self.experiment, artifact_location=location))

    def register_bundle(
        self,
        bundle_root: Path,
        *,
        metrics: dict[str, float],
        params: dict[str, Any],
        alias: str | None,
        run_name: str | None = None,
        artifacts_dir: Path | None = None,
        tags: dict[str, str] | None = None,
        dataset: TrainingInput | None = None,
    ) -> ModelVersionInfo:
        """Log one run (params, metrics, ``artifacts_dir`` at the run root, the bundle as ``model/``,
        ``dataset`` as the run's training input), register it as a new version, stamp
        ``version``/``run_id`` into the stored ``bundle.json`` and set ``alias`` when given. The
        local ``bundle_root`` is left unchanged."""
        bundle = Bundle.open(bundle_root)  # never register a bundle that does not verify
        if alias is not None:
            check_alias(alias)
        self.create_store()
        with self._answering():
            return self._register(bundle, metrics, params, alias, run_name, artifacts_dir, tags, dataset)

    def _register(
        self,
        bundle: Bundle,
        metrics: dict[str, float],
        params: dict[str, Any],
        alias: str | None,
        run_name: str | None,
        artifacts_dir: Path | None,
        tags: dict[str, str] | None,
        dataset: TrainingInput | None = None,
    ) -> ModelVersionInfo:
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(self.experiment_id(), run_name=run_name, tags=dict(tags or {}))
        run_id = run.info.run_id
        mv: Any = None
        try:
            now = int(datetime.now(UTC).timestamp() * 1000)
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())],
                params=[Param(k, _param_value(v)) for k, v in sorted(params.items())],
                tags=[RunTag("motlens.bundle_files", str(len(bundle.manifest["files"])))],
            )
            if dataset is not None:
                self.client.log_inputs(run_id, datasets=[dataset.entity()])
            if artifacts_dir is not None:
                self.client.log_artifacts(run_id, str(artifacts_dir))
            self.client.log_artifacts(run_id, str(bundle.root), MODEL_ARTIFACT_PATH)
            source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
            self._ensure_registered_model()
            mv = self.client.create_model_version(
                self.model_name, source=source, run_id=run_id, tags={INCOMPLETE_TAG: INCOMPLETE}
            )
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy(bundle.root / MANIFEST, Path(tmp) / MANIFEST)
                set_manifest_fields(Path(tmp), version=str(mv.version), run_id=run_id, name=self.model_name)
                self.client.log_artifact(run_id, str(Path(tmp) / MANIFEST), MODEL_ARTIFACT_PATH)
                digest = sha256_file(Path(tmp) / MANIFEST)
            self.client.set_model_version_tag(self.model_name, str(mv.version), DIGEST_TAG, digest)
            if artifacts_dir is not None and (artifacts_dir / HELDOUT_MANIFEST).is_file():
                held = sha256_file(artifacts_dir / HELDOUT_MANIFEST)
                self.client.set_model_version_tag(self.model_name, str(mv.version), HELDOUT_DIGEST_TAG, held)
            self.client.set_tag(run_id, "motlens.registered_version", str(mv.version))
            self.client.delete_model_version_tag(self.model_name, str(mv.version), INCOMPLETE_TAG)
        except BaseException:
            self._abandon(run_id, run.info.artifact_uri, None if mv is None else str(mv.version))
            raise
        self.client.set_terminated(run_id)
        if alias is not None:
            self.set_alias(alias, str(mv.version))
        return self.resolve(str(mv.version))

    def _abandon(self, run_id: str, artifact_uri: str, version: str | None) -> None:
        """After a failed registration, best effort (a failure is logged; the caller raises the
        original error): delete the version it created, then the run's stored bundle copy, and mark
        the run FAILED (its params and metrics stay). A version that cannot be deleted keeps
        :data:`INCOMPLETE_TAG` (never resolved) and its bundle copy."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        if version is None or _best_effort(
            f"delete version {version}", lambda: self.client.delete_model_version(self.model_name, version)
        ):
            _best_effort(
                f"delete the stored bundle of run {run_id}",
                lambda: get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri).delete_artifacts(
                    MODEL_ARTIFACT_PATH
                ),
            )
        _best_effort(f"mark run {run_id} FAILED", lambda: self.client.set_terminated(run_id, status="FAILED"))

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(self.model_name)

    # ---- resolving -------------------------------------------------------------------------

    def resolve(self, ref: str) -> ModelVersionInfo:
        """``models:/mot-defects@alias``, ``models:/mot-defects/3``, ``alias`` or ``3`` → the version."""
        from mlflow.exceptions import MlflowException

        ref = str(ref).strip()
        alias, version = self._parse_ref(ref)
        try:
            if alias is not None:
                mv = self.client.get_model_version_by_alias(self.model_name, alias)
            else:
                mv = self.client.get_model_version(self.model_name, str(version))
        except MlflowException as e:
            if e.error_code not in _NOT_FOUND:
                raise self._failure(e) from e
            raise UnknownModelRef(self._unknown_ref_message(ref, alias, version)) from e
        info = self._info(mv)
        if info.incomplete:
            raise IncompleteVersion(
                f"version {info.version} of registered model {self.model_name!r}"
                f"{f' (alias {alias!r})' if alias else ''} is incomplete: its registration did not finish "
                f"({INCOMPLETE_TAG}={INCOMPLETE}), so its stored bundle may not name it; register the model "
                "again (and delete this version)"
            )
        return info

    @contextmanager
    def _answering(self) -> Iterator[None]:
        """MLflow and HTTP errors as :class:`RegistryError` with the URI's credentials removed (MLflow's
        own messages carry the full tracking URI)."""
        import requests
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, requests.exceptions.RequestException) as e:
            raise self._failure(e) from e
        except Exception as e:
            if _busy(e):
                raise self._failure(e) from e
            raise

    def _failure(self, e: Exception) -> RegistryError:
        """A registry that is down or failing, named without any credentials in its URI;
        :class:`RegistryUnreachable` when the request never got an answer or a local sqlite store stayed
        locked by another process past MLflow's wait (both pass: the caller may retry or hold)."""
        detail = redact(str(e).splitlines()[0])[:300] if str(e) else type(e).__name__  # cut after redacting
        if _busy(e):
            return RegistryUnreachable(
                redact(f"model registry {self.tracking_uri} is busy: another process holds its database locked "
                       f"({detail})")
            )  # fmt: skip
        kind = RegistryUnreachable if _transport_failure(e) else RegistryError
        return kind(redact(f"model registry {self.tracking_uri} unreachable or failing: {detail}"))

    def _version_in_range(self, version: str | None) -> str | None:
        """``version`` if a registry can hold it (1 to :data:`MAX_VERSION`: MLflow numbers from 1, and its
        stores' integer column), else :class:`UnknownModelRef` (no store is asked: it never exists)."""
        if version is not None and not 1 <= int(version) <= MAX_VERSION:
            raise UnknownModelRef(
                f"version {version} of registered model {self.model_name!r} does not exist "
                f"(versions run from 1 to {MAX_VERSION})"
            )
        return version

    def _parse_ref(self, ref: str) -> tuple[str | None, str | None]:
        m = _MODELS_URI.match(ref)
        if m:
            if m["name"] != self.model_name:
                raise RegistryError(f"model reference {ref!r} names {m['name']!r}, not {self.model_name!r}")
            if m["alias"] is not None:
                _readable_alias(m["alias"])  # one no registry can hold: refused, not looked up for ever
            return m["alias"], self._version_in_range(m["version"])
        if _DIGITS.fullmatch(ref):
            return None, self._version_in_range(ref)
        if ref.startswith("@"):
            ref = ref[1:]
        if _ALIAS.match(ref):
            return ref, None
        raise RegistryError(
            f"cannot read model reference {ref!r}: use models:/{self.model_name}@<alias>, "
            f"models:/{self.model_name}/<version>, an alias name or a version number"
        )

    def _unknown_ref_message(self, ref: str, alias: str | None, version: str | None) -> str:
        try:
            known = self.aliases()
        except Exception:  # noqa: BLE001 - the message must not hide the original problem
            known = {}
        listed = ", ".join(f"{a} → {v}" for a, v in sorted(known.items())) or "none"
        if alias is not None:
            return f"alias {alias!r} is not set on registered model {self.model_name!r} (aliases: {listed})"
        return f"version {version} of registered model {self.model_name!r} does not exist (aliases: {listed})"

    def _info(self, mv: Any, metrics: bool = True) -> ModelVersionInfo:
        # the name and version become cache paths: take only what this registry client asked for
        if mv.name != self.model_name or not _DIGITS.fullmatch(str(mv.version)):
            raise RegistryError(
                f"the registry answered with model {str(mv.name)[:80]!r} version {str(mv.version)[:20]!r} "
                f"for {self.model_name!r}; refused"
            )
        run_metrics, run_params = self._run_data(mv.run_id) if metrics else ({}, {})
        return ModelVersionInfo(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id or None,
            artifact_uri=mv.source,
            aliases=sorted(mv.aliases or []),
            tags=dict(mv.tags or {}),
            metrics=run_metrics,
            created_at=_from_ms(mv.creation_timestamp),
            params=run_params,
        )

    def artifact_uri(self, ref: str) -> str:
        """The bundle directory's artifact location (what a KServe ``storageUri`` needs)."""
        return self.resolve(ref).artifact_uri

    def fetch(self, ref: str, dst: Path | None = None) -> Bundle:
        """Download the bundle of ``ref`` (cached per version), verify every hash, return it.

        From the cache (no ``dst``) the version is leased while the returned bundle lives (no prune, of
        any process, removes it) and marked used now; a download then prunes the cache
        (:meth:`prune_cache`; a failure to prune is only logged). Raises
        :class:`motlens.bundle.BundleError` when the stored bundle fails verification or its manifest
        names another version or run than the registry.
        """
        info = self.resolve(ref)
        if dst is not None:
            return self._fetch(info, Path(dst))[0]
        target = self.cache_dir / info.name / info.version
        lease = _hold(target)
        try:
            bundle, downloaded = self._fetch(info, target)
        except BaseException:
            if lease is not None:
                os.close(lease)
            raise
        if lease is not None:
            weakref.finalize(bundle, os.close, lease)
        with contextlib.suppress(OSError):  # a read-only cache: its recency is not recorded
            os.utime(target)
        if downloaded:
            try:
                self.prune_cache()
            except Exception as e:  # noqa: BLE001 - the fetch stands; the next download prunes
                log.warning("registry cache %s not pruned: %s", self.cache_dir, e)
        return bundle

    def _fetch(self, info: ModelVersionInfo, target: Path) -> tuple[Bundle, bool]:
        """The verified bundle of ``info`` in ``target``, and whether it was downloaded (not already there)."""
        import mlflow.artifacts

        if (target / MANIFEST).is_file():
            try:
                return self._check_stored(Bundle.open(target), info), False
            except BundleError:
                shutil.rmtree(target)  # stale or damaged cache: download afresh below
        elif target.exists() and any(target.iterdir()):
            raise RegistryError(f"{target} exists and is not a bundle; give an empty or new directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            with self._answering():
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=info.artifact_uri, dst_path=str(staging), tracking_uri=self.tracking_uri
                )
            try:
                bundle = self._check_stored(Bundle.open(path), info)
            except BundleError as e:
                raise BundleError(f"stored bundle of {info.name} version {info.version} refused: {e}") from e
            try:
                Path(path).rename(target)
            except OSError:  # another process put a copy there first: use it if it verifies
                try:
                    return self._check_stored(Bundle.open(target), info), False
                except BundleError:
                    shutil.rmtree(target, ignore_errors=True)
                    Path(path).rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Bundle(target, bundle.manifest), True

    def prune_cache(self) -> list[str]:
        """Delete the cached versions of this model that nothing needs; returns them.

        Kept: a version any process holds (:func:`_hold`: loaded, being loaded, read by a drift or
        promotion run), one an alias or a last-known-good record names, and the ``model_cache_keep``
        most recently fetched of the others. Download staging folders are never touched. Raises
        :class:`RegistryError` before deleting any version when the aliases cannot be read."""
        folder = self.cache_dir / self.model_name
        if not folder.is_dir():
            return []
        for spent in folder.glob(f"{PRUNED_PREFIX}*"):
            shutil.rmtree(spent, ignore_errors=True)
        named = set(self.aliases().values())
        recorded = self._lkg_roots()
        candidates = []
        for path in folder.iterdir():
            if _DIGITS.fullmatch(path.name) and path.name not in named and path.resolve() not in recorded:
                with contextlib.suppress(FileNotFoundError):  # pruned by another process meanwhile
                    candidates.append((path.stat().st_mtime, path))
        kept, gone = 0, []
        for _, path in sorted(candidates, reverse=True):
            lease = _take(_lease_path(path), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if lease is None:  # held (in use), or a cache this process cannot lock: left
                continue
            try:
                if not path.is_dir():
                    continue
                if kept < self.state.model_cache_keep:
                    kept += 1
                    continue
                spent = Path(tempfile.mkdtemp(prefix=PRUNED_PREFIX, dir=folder))
                path.rename(spent / path.name)
                _lease_path(path).unlink()
            finally:
                os.close(lease)
            size = sum(f.stat().st_size for f in spent.rglob("*") if f.is_file())
            shutil.rmtree(spent, ignore_errors=True)
            log.info("registry cache: %s version %s removed (%.0f MB)", self.model_name, path.name, size / 1e6)
            gone.append(path.name)
        return gone

    def _lkg_roots(self) -> set[Path]:
        """The cached bundles the last-known-good records name (an unreadable record names none: it is
        refused when read, too)."""
        roots = set()
        for record in (self.cache_dir / LKG_DIR).glob("*.json"):
            try:
                roots.add((self.cache_dir / str(json.loads(record.read_text())["bundle_path"])).resolve())
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return roots

    def fetch_run_dir(self, ref: str, path: str, dst: Path) -> Path | None:
        """Download the run artifact directory ``path`` of version ``ref``'s run into ``dst``; ``None``
        when the run has no such directory (or no run)."""
        import mlflow.artifacts

        info = self.resolve(ref)
        if not info.run_id:
            return None
        with self._answering():
            if not self.client.list_artifacts(info.run_id, path):
                return None
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=info.run_id, artifact_path=path, dst_path=str(dst), tracking_uri=self.tracking_uri
                )
            )

    def _check_stored(self, bundle: Bundle, info: ModelVersionInfo) -> Bundle:
        """``bundle`` (every file verified against its manifest) is the one registered as ``info``: its
        manifest's sha256 is the version's :data:`DIGEST_TAG`, and it names the same version and run."""
        expected = info.tags.get(DIGEST_TAG)
        if expected:
            actual = sha256_file(bundle.root / MANIFEST)
            if actual != expected:
                raise BundleError(
                    f"{bundle.root}: {MANIFEST} has sha256 {actual}; the registry recorded {expected} "
                    f"for {info.name} version {info.version} at registration"
                )
        elif info.version not in self._unpinned_warned:
            self._unpinned_warned.add(info.version)
            log.warning(
                "%s version %s has no %s tag (registered by a release before 2026-12-01): its bundle is "
                "verified against its own manifest only; `motlens train pin %s` pins it",
                info.name,
                info.version,
                DIGEST_TAG,
                info.version,
            )
        stored, run = str(bundle.manifest.get("version")), bundle.manifest.get("run_id")
        if stored != info.version:
            raise BundleError(f"{bundle.root}: bundle.json says version {stored}, registry {info.version}")
        if info.run_id and run != info.run_id:
            raise BundleError(f"{bundle.root}: bundle.json says run {run}, registry {info.run_id}")
        return bundle

    # ---- last-known-good bundles -----------------------------------------------------------

    def pin(self, ref: str, expect: str | None = None) -> tuple[ModelVersionInfo, str, bool]:
        """Give ``ref``, a version registered without a :data:`DIGEST_TAG` (before 2026-12-01), the sha256
        of its stored ``bundle.json`` once the stored bundle verifies (every file against its manifest, the
        manifest naming this version and run), and :data:`PINNED_LATER_TAG`. ``expect``, when given, must
        be that sha256 (a digest recorded elsewhere); without it the pin trusts the store as it is now.
        A version pinned already is checked against its tag and left as it is. Returns the version, the
        digest and whether this call set it."""
        if expect is not None and not _SHA256.fullmatch(expect):
            raise RegistryError(f"expected sha256 {expect!r} is not 64 lowercase hex characters")
        info = self.resolve(ref)
        pinned = bool(info.tags.get(DIGEST_TAG))
        outcome = "refused" if pinned else "not pinned"
        self._unpinned_warned.add(info.version)  # this call is the answer to that warning
        with tempfile.TemporaryDirectory(prefix="motlens-pin-") as tmp:
            try:
                bundle = self.fetch(info.version, dst=Path(tmp) / "bundle")
            except BundleError as e:
                raise RegistryError(f"version {info.version} {outcome}: {e}") from e
            digest = sha256_file(bundle.root / MANIFEST)
        if expect is not None and digest != expect:
            raise RegistryError(
                f"version {info.version} {outcome}: its stored {MANIFEST} has sha256 {digest}, not the "
                f"expected {expect}"
            )
        if pinned:
            return info, digest, False
        stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        with self._answering():
            self.client.set_model_version_tag(self.model_name, info.version, DIGEST_TAG, digest)
            self.client.set_model_version_tag(self.model_name, info.version, PINNED_LATER_TAG, stamp)
        return self.resolve(info.version), digest, True

    def canonical_ref(self, ref: str) -> str:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` for any accepted spelling of ``ref``."""
        alias, version = self._parse_ref(str(ref).strip())
        return f"models:/{self.model_name}@{alias}" if alias is not None else f"models:/{self.model_name}/{version}"

    def lkg_path(self, ref: str) -> Path:
        """Where the last-known-good record of ``ref`` lives: ``<cache_dir>/.lkg/<name>@<alias>.json``
        or ``<name>-v<version>.json`` (beside the bundles it points to)."""
        alias, version = self._parse_ref(str(ref).strip())
        stem = f"{self.model_name}@{alias}" if alias is not None else f"{self.model_name}-v{version}"
        return self.cache_dir / LKG_DIR / f"{stem}.json"

    def record_lkg(self, ref: str, bundle: Bundle) -> Path:
        """Remember ``bundle`` (fetched into the cache, verified, loaded and golden-checked) as the
        last-known-good bundle of ``ref``: a JSON record, written atomically."""
        root, cache = bundle.root.resolve(), self.cache_dir.resolve()
        if not root.is_relative_to(cache):
            raise RegistryError(f"{root} is not in the registry cache {cache}; not recorded")
        record = {
            "ref": self.canonical_ref(ref),
            "name": str(bundle.manifest.get("name") or self.model_name),
            "version": str(bundle.manifest.get("version")),
            "run_id": bundle.run_id,
            "bundle_path": root.relative_to(cache).as_posix(),
            "manifest_sha256": sha256_file(root / MANIFEST),
            "recorded_at": datetime.now(UTC).isoformat(),
        }
        path = self.lkg_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record, indent=2, sort_keys=True))
        return path

    def lkg_bundle(self, ref: str) -> tuple[Bundle, dict[str, Any]]:
        """The last-known-good bundle of ``ref`` and its record, re-verified (every file hash, the
        manifest's own hash, its version and run); raises :class:`RegistryError` or
        :class:`BundleError` saying why it cannot be used."""
        path = self.lkg_path(ref)
        if not path.is_file():
            raise RegistryError(f"no last-known-good bundle recorded for {self.canonical_ref(ref)} ({path})")
        try:
            record = json.loads(path.read_text())
            rel, digest, version = str(record["bundle_path"]), str(record["manifest_sha256"]), str(record["version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RegistryError(f"last-known-good record {path} is unreadable ({e})") from e
        cache = self.cache_dir.resolve()
        root = (cache / rel).resolve()
        if not root.is_relative_to(cache):
            raise RegistryError(f"last-known-good record {path} points outside the registry cache: {rel}")
        bundle = Bundle.open(root)  # every file hash; BundleError names the first problem
        actual = sha256_file(root / MANIFEST)
        if actual != digest:
            raise BundleError(f"{root}: sha256 mismatch for {MANIFEST} against the last-known-good record")
        if str(bundle.manifest.get("version")) != version or bundle.run_id != record.get("run_id"):
            raise BundleError(f"{root}: bundle.json does not name version {version}, run {record.get('run_id')}")
        return bundle, record

    # ---- aliases, tags, listings -----------------------------------------------------------

    def set_alias(self, alias: str, version: str | int) -> None:
        check_alias(alias)
        self.resolve(str(version))  # clear error for an unknown version
        with self._answering():
            self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        """Remove ``alias`` (a no-op when it is not set)."""
        with self._answering():
            self.client.delete_registered_model_alias(self.model_name, alias)

    def alias_version(self, alias: str) -> str | None:
        return self.aliases().get(alias)

    def _registered_model(self) -> Any | None:
        """The registered model (None before the first registration)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.model_name)
        except MlflowException as e:
            if e.error_code not in _NOT_FOUND:
                raise self._failure(e) from e
            return None

    def aliases(self) -> dict[str, str]:
        """Alias → version for every alias currently set (empty before the first registration)."""
        rm = self._registered_model()
        return {a: str(v) for a, v in (rm.aliases or {}).items()} if rm is not None else {}

    def set_tags(self, version: str | int, tags: dict[str, Any]) -> None:
        self.resolve(str(version))
        with self._answering():
            for k, v in tags.items():
                self.client.set_model_version_tag(self.model_name, str(version), k, _param_value(v))

    def model_tags(self) -> dict[str, str]:
        """The registered model's own tags (empty before the first registration)."""
        rm = self._registered_model()
        return dict(rm.tags or {}) if rm is not None else {}

    def set_model_tag(self, key: str, value: str) -> None:
        with self._answering():
            self.client.set_registered_model_tag(self.model_name, key, value)

    def delete_model_tag(self, key: str) -> None:
        """Remove the registered model's tag ``key`` (a no-op when it is not set)."""
        from mlflow.exceptions import MlflowException

        with self._answering():
            try:
                self.client.delete_registered_model_tag(self.model_name, key)
            except MlflowException as e:
                if e.error_code not in _NOT_FOUND:
                    raise

    def versions(self, include_incomplete: bool = False, limit: int | None = None) -> list[ModelVersionInfo]:
        """The versions, newest (highest number) first, with aliases, tags and run metrics: every one, or
        the newest ``limit``; one whose registration did not finish (:attr:`ModelVersionInfo.incomplete`)
        only with ``include_incomplete``. Read a page of :data:`VERSIONS_PAGE` at a time, to the last
        (MLflow stops one search at 10,000 without saying so), and the runs' metrics and params in batches
        of :data:`RUNS_BATCH` (a call per version took 17 s for 2,000 on sqlite, 50 s through a server)."""
        by_version: dict[str, list[str]] = {}
        for a, v in self.aliases().items():
            by_version.setdefault(v, []).append(a)
        out: list[ModelVersionInfo] = []
        token = None
        size = VERSIONS_PAGE if limit is None else min(VERSIONS_PAGE, limit)
        with self._answering():
            while limit is None or len(out) < limit:
                page = self.client.search_model_versions(
                    f"name = '{self.model_name}'", max_results=size, order_by=["version_number DESC"], page_token=token
                )
                for mv in page:
                    info = self._info(mv, metrics=False)
                    info.aliases = sorted(by_version.get(info.version, []))
                    if include_incomplete or not info.incomplete:
                        out.append(info)
                token = page.token
                if not token:
                    break
        out = sorted(out, key=lambda i: int(i.version), reverse=True)[:limit]
        runs = self._runs_data([i.run_id for i in out if i.run_id])
        for info in out:
            info.metrics, info.params = runs.get(info.run_id or "", ({}, {}))
        return out

    def _runs_data(self, run_ids: list[str]) -> dict[str, tuple[dict[str, float], dict[str, str]]]:
        """Metrics and params of these runs, :data:`RUNS_BATCH` a search; a run the searches do not find
        (another experiment's, or gone) is asked for by id (:meth:`_run_data`)."""
        from mlflow.entities import ViewType

        found: dict[str, tuple[dict[str, float], dict[str, str]]] = {}
        wanted = list(dict.fromkeys(run_ids))
        if not wanted:
            return found
        with self._answering():
            experiment = self.client.get_experiment_by_name(self.experiment)
        for start in range(0, len(wanted) if experiment is not None else 0, RUNS_BATCH):
            ids = ", ".join(f"'{r}'" for r in wanted[start : start + RUNS_BATCH] if _RUN_ID.match(r))
            if not ids:
                continue
            with self._answering():
                runs = self.client.search_runs(
                    [experiment.experiment_id], f"attributes.run_id IN ({ids})", run_view_type=ViewType.ALL,
                    max_results=RUNS_BATCH,
                )  # fmt: skip
            for run in runs:
                found[run.info.run_id] = (dict(run.data.metrics), dict(run.data.params))
        for run_id in wanted:
            if run_id not in found:
                with self._answering():
                    found[run_id] = self._run_data(run_id)
        return found

    def run_metrics(self, version: str | int) -> dict[str, float]:
        return self.resolve(str(version)).metrics

    def _run_data(self, run_id: str | None) -> tuple[dict[str, float], dict[str, str]]:
        """The run's metrics and params; empty when the run is gone (deleted and garbage-collected)."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return {}, {}
        try:
            data = self.client.get_run(run_id).data
        except MlflowException as e:
            if e.error_code not in _NOT_FOUND:
                raise self._failure(e) from e
            log.warning("run %s of a registered version is gone: no metrics", run_id)
            return {}, {}
        return dict(data.metrics), dict(data.params)


def _lease_path(version_dir: Path) -> Path:
    return version_dir.parent / f".{version_dir.name}.lease"


def _take(path: Path, op: int) -> int | None:
    """A descriptor of ``path`` (created if missing) with ``flock(op)`` on it; None when it cannot be
    opened or locked (``LOCK_NB``), or when a prune removed it while this waited."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, op)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except OSError:  # held (LOCK_NB), or removed: the path is no longer this file
        pass
    os.close(fd)
    return None


def _hold(version_dir: Path) -> int | None:
    """A shared lease on a cached version (waits for a prune that holds it); None where the cache cannot
    be written (the lease file cannot be created there)."""
    with contextlib.suppress(OSError):
        version_dir.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a prune that removed the file while this waited: the new one
        fd = _take(_lease_path(version_dir), fcntl.LOCK_SH)
        if fd is not None:
            return fd
    return None


def _http_defaults() -> None:
    """Bound how long an MLflow server that does not answer holds a command: MLflow's own defaults
    (7 retries with backoff, 120 s per request) wait over 4 minutes for a closed port. MLflow reads
    these variables at every request, so they are set in this process (only where the user has not
    set them); 30 s still lets a proxying server store a large bundle before it answers an upload."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _busy(e: BaseException) -> bool:
    """``e`` (or what it was raised from) is sqlite's "database is locked": another process held the
    store's write lock past the driver's wait."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if "database is locked" in str(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _transport_failure(e: BaseException) -> bool:
    """``e`` (or what it was raised from) is a failed HTTP exchange: no connection, a timeout, or
    retries exhausted on 5xx/429. MLflow wraps these in an ``INTERNAL_ERROR`` MlflowException."""
    import requests

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, requests.exceptions.RequestException):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _best_effort(what: str, step: Callable[[], object]) -> bool:
    """Run ``step``; a failure is logged as not being able to do ``what``. Whether it succeeded."""
    try:
        step()
    except Exception as e:  # noqa: BLE001 - cleanup after a failure: the first error is the one raised
        log.warning("registration failed; could not %s: %s", what, redact(str(e) or repr(e)))
        return False
    return True


def ref_alias(ref: str, model_name: str) -> str | None:
    """The alias a ``models:/MODEL_NAME@ALIAS`` reference names; None for a version, a path or another model."""
    m = _MODELS_URI.match(ref)
    return m["alias"] if m and m["name"] == model_name else None


def _readable_alias(alias: str) -> None:
    """Raise :class:`RegistryError` for an alias no MLflow registry can hold (its own rule: letters of any
    script, digits, '_' or '-', at most 255, not v<number>); ``latest`` is MLflow's newest version. Wider
    than :func:`check_alias`, which motlens applies to the aliases it sets."""
    if alias.lower() != "latest" and (not _MLFLOW_ALIAS.fullmatch(alias) or _VERSION_ALIAS.fullmatch(alias)):
        raise RegistryError(
            f"invalid alias {alias!r}: MLflow's aliases are letters, digits, '_' or '-' (at most 255), not v<number>"
        )


def check_alias(alias: str) -> None:
    """Raise :class:`RegistryError` for a name MLflow would refuse as an alias."""
    if not _ALIAS.match(alias):
        raise RegistryError(f"invalid alias {alias!r}: letters, digits, '_' or '-', starting with a letter")
    if alias.lower() == "latest" or _VERSION_ALIAS.fullmatch(alias):
        raise RegistryError(f"invalid alias {alias!r}: MLflow reserves 'latest' and v<number> (version references)")


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s[:6000]


def _from_ms(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None
