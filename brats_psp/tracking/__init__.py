"""MLflow tracking: one run per training job, written by rank 0 only.

The tracking store is MLflow's own default (``sqlite:///mlflow.db`` in the working
directory) unless ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` names another one; a remote
``mlflow server`` works the same way.

* :mod:`~brats_psp.tracking.live`: :class:`RunTracker`, the run of a training job, which
  keeps the calls it could not send when the store is down; :class:`NullTracker` for ranks
  > 0 and ``tracking.enabled: false``;
* :mod:`~brats_psp.tracking.replay`: :func:`replay_pending` sends the kept calls later
  (``python pipelines/run.py sync-mlflow <run dir>``);
* :mod:`~brats_psp.tracking.store`: the store's URI, the files a run keeps in its folder, how
  a model is logged.
"""

from brats_psp.tracking.live import NullTracker, RunTracker, make_tracker
from brats_psp.tracking.replay import ReplayError, replay_pending
from brats_psp.tracking.store import (
    PENDING_FILE,
    REPLAYED_FILE,
    RUNNING_FILE,
    case_set,
    clear_running,
    configure_tracking,
    git_commit,
    mark_running,
    resolve_tracking_uri,
    training_process,
)

__all__ = [
    "RunTracker",
    "NullTracker",
    "make_tracker",
    "ReplayError",
    "replay_pending",
    "PENDING_FILE",
    "REPLAYED_FILE",
    "RUNNING_FILE",
    "case_set",
    "clear_running",
    "configure_tracking",
    "git_commit",
    "mark_running",
    "resolve_tracking_uri",
    "training_process",
]
