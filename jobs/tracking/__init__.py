"""Experiment tracking behind a small interface (torchtitan ``components/metrics.py`` style).

Only rank 0 tracks; every other rank gets a ``NullTracker``. ``MlflowTracker``
never blocks the training loop: calls enqueue, a background thread delivers.
"""

from jobs.tracking.base import NullTracker, Tracker, flatten_params, resolve_tracking_uri

__all__ = ["NullTracker", "Tracker", "flatten_params", "resolve_tracking_uri"]
