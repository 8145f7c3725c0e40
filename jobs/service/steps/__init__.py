"""The steps of the service DAG: prepare, train, evaluate, register.

``data`` prepares the dataset and trains on it, ``model`` evaluates the
checkpoint and registers it, ``standalone`` runs evaluate and register on
their own for a checkpoint the user names; ``cache`` keeps each step's
committed record. (The Ray Data transforms that prepare runs are *stages*:
``pipeline/stage.py``.)

``prepare``, ``train``, ``evaluate`` and ``register`` each run one step and
return its ``StepOutcome``; ``dag.run_pipeline`` calls them in that order.
"""

from jobs.service.steps.data import prepare, train
from jobs.service.steps.model import evaluate, register

__all__ = ["evaluate", "prepare", "register", "train"]
