"""Experiment tracking behind a small interface (torchtitan ``components/metrics.py`` style).

One ``Tracker`` interface, three implementations. Only rank 0 of training tracks; every
other rank gets a ``NullTracker``. The trainer's ``MlflowTracker`` never blocks the
training loop: calls enqueue, a background thread delivers. The pipeline's runs (a parent
and one nested run per DAG step) are ``ClientTracker``: explicit run ids, written at once.
"""

from jobs.tracking.base import NullTracker, Tracker, flatten_params, resolve_tracking_uri
from jobs.tracking.client_tracker import ClientTracker

__all__ = ["ClientTracker", "NullTracker", "Tracker", "flatten_params", "resolve_tracking_uri"]
