"""MLflow Model Registry: publish a Hugging Face folder as a version, gate the champion.

A version's source is the run artifact folder ``runs:/RUN/model`` holding plain
files (safetensors, JSON), registered with ``create_model_version``: no MLflow
flavor, so nothing is pickled and any client can read it. Every new version
gets the alias ``candidate``; ``champion`` moves only through ``decide``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.service.config import RegistryConfig

CANDIDATE = "candidate"
CHAMPION = "champion"
ARTIFACT_PATH = "model"

# Model-version tags written by ``steps.register`` and read back by the gate.
TAG_GATE_METRIC = "moe.gate_metric"
TAG_GATE_LOSS = "moe.gate_loss"
TAG_EVAL_DATA = "moe.eval_data"
TAG_BECAME_CHAMPION = "moe.became_champion"
TAG_FINGERPRINT = "moe.register_fingerprint"


@dataclass
class GateDecision:
    promote: bool
    reason: str
    metric: str
    new_loss: float
    champion_version: str | None = None
    champion_loss: float | None = None

    def as_tags(self) -> dict[str, str]:
        return {
            "gate.decision": "promote" if self.promote else "keep",
            "gate.reason": self.reason,
            "gate.metric": self.metric,
            "gate.champion_version": self.champion_version or "",
        }

    def as_metrics(self) -> dict[str, float]:
        out = {"gate/new_loss": self.new_loss}
        if self.champion_loss is not None:
            out["gate/champion_loss"] = self.champion_loss
        return out


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as e2:  # another run created it in between
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def publish_version(client, run_id: str, folder: Path, name: str, tags: dict[str, Any]):
    """Log ``folder`` under the run's ``model/`` artifacts and register it. The caller aliases
    it ``candidate`` under the champion gate's lock: MLflow's first write of an alias is not
    safe against a second one at the same moment (a UNIQUE constraint error)."""
    client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_PATH)
    ensure_registered_model(client, name)
    mv = client.create_model_version(
        name,
        source=f"runs:/{run_id}/{ARTIFACT_PATH}",
        run_id=run_id,
        tags={k: str(v) for k, v in tags.items()},
    )
    return mv


def version_by_alias(client, name: str, alias: str):
    """The model version holding ``alias``, or None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def find_version(client, name: str, fingerprint: str):
    """A version registered from the same inputs (cache hit of the register step), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(
            f"name = '{name}' and tags.`{TAG_FINGERPRINT}` = '{fingerprint}'"
        )
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version), default=None)


ChampionLoss = Callable[[Any], tuple[float | None, str]]


def decide(
    cfg: RegistryConfig, metric: str, new_loss: float, champion, champion_loss: ChampionLoss
) -> GateDecision:
    """Whether the new version becomes champion; ``champion_loss(mv)`` scores the incumbent.

    ``champion_loss`` returns ``(loss, how)``: the champion's loss on the SAME
    eval rows, or ``(None, why not)`` when no comparable number exists.
    """
    d = GateDecision(False, "", metric, new_loss)
    if cfg.gate == "never":
        d.reason = "gate is 'never': champion is moved by hand only"
        return d
    if champion is None:
        d.promote, d.reason = True, "no champion yet"
        return d
    d.champion_version = str(champion.version)
    if cfg.gate == "always":
        d.promote, d.reason = True, "gate is 'always'"
        return d
    d.champion_loss, how = champion_loss(champion)
    if d.champion_loss is None:
        d.reason = f"kept champion v{champion.version}: {how}"
        return d
    d.promote = new_loss < d.champion_loss - cfg.gate_min_delta
    verb = "beats" if d.promote else "does not beat"
    d.reason = (
        f"{metric} {new_loss:.4f} {verb} champion v{champion.version} {d.champion_loss:.4f}"
        f" (min delta {cfg.gate_min_delta}, champion {how})"
    )
    return d


def apply_decision(client, name: str, version: str, decision: GateDecision) -> None:
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, TAG_BECAME_CHAMPION, str(decision.promote).lower())
    for key, value in decision.as_tags().items():
        client.set_model_version_tag(name, version, key, value)


def recheck_champion(client, name: str, decision: GateDecision, eval_data, set_name: str):
    """After moving ``champion``: if a version registered since the incumbent we compared
    against was promoted on the same eval data with a lower loss (a register that ran at
    the same time elsewhere), the alias goes back to the best of them. Returns the champion."""
    since = int(decision.champion_version or 0)
    rivals = [
        v for v in client.search_model_versions(f"name = '{name}'")
        if int(v.version) > since
        and v.tags.get(TAG_BECAME_CHAMPION) == "true"
        and v.tags.get(TAG_GATE_METRIC) == decision.metric
        and v.tags.get(f"{TAG_EVAL_DATA}.{set_name}") == eval_data
        and TAG_GATE_LOSS in v.tags
    ]  # fmt: skip
    champion = version_by_alias(client, name, CHAMPION)
    if not rivals or champion is None:
        return champion
    best = min(rivals, key=lambda v: (float(v.tags[TAG_GATE_LOSS]), int(v.version)))
    held = float(champion.tags.get(TAG_GATE_LOSS, "inf"))
    if str(best.version) != str(champion.version) and float(best.tags[TAG_GATE_LOSS]) < held:
        client.set_registered_model_alias(name, CHAMPION, best.version)
        return best
    return champion
