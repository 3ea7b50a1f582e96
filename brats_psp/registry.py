"""The model registry, as MLflow 3 intends it: a registered model per task, aliases for the version in use.

``promote RUN --name NAME --alias champion`` registers the run's logged model (``runs:/<run>/model``)
under ``NAME`` unless a version of ``NAME`` already comes from that run, and points the alias at
that version (moving it if it pointed elsewhere; stages are deprecated since MLflow 2.9).
``infer --model models:/NAME@champion`` and ``export`` then resolve the alias to the run's
``checkpoints/best.pt`` (:func:`brats_psp.checkpoint.resolve_checkpoint`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from brats_psp.errors import RunError

__all__ = ["Promotion", "promote"]

log = logging.getLogger(__name__)


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    run_id: str
    registered_now: bool  # False: the run's version existed and only the alias moved

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def promote(run_id: str, name: str, alias: str = "champion", tracking_uri: str | None = None) -> Promotion:
    """Register ``run_id``'s model under ``name`` (once) and point ``alias`` at that version.

    Raises:
        RunError: the run does not exist or logged no model (``tracking.log_model=false``).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except Exception as err:
        raise RunError(f"promote {run_id}: no such MLflow run at {client.tracking_uri} ({err})") from None
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")  # [] for a name not registered yet
    if existing:
        version, registered_now = max(existing, key=lambda v: int(v.version)), False
    else:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            version = mlflow.register_model(f"runs:/{run_id}/model", name)
        except Exception as err:
            raise RunError(
                f"promote {run_id}: the run has no logged model to register ({err}); train with tracking.log_model=true"
            ) from None
        registered_now = True
    client.set_registered_model_alias(name, alias, version.version)
    log.info("%s version %s (run %s) is now %s@%s", name, version.version, run_id, name, alias)
    return Promotion(name, str(version.version), alias, run_id, registered_now)

