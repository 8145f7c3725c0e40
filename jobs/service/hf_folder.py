"""A model as a Hugging Face folder: what the registry stores and what users download.

Files: ``config.json`` + ``model.safetensors`` (``moe_model.hf.save_hf``, a
``MixtralForCausalLM`` checkpoint), ``tokenizer.json`` with
``tokenizer_config.json`` and ``special_tokens_map.json`` (so
``AutoTokenizer.from_pretrained`` works), and ``generation_config.json``.
Nothing in the folder is a pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import JobError

REQUIRED = ("config.json", "tokenizer.json")


@dataclass
class LoadedModel:
    model: Any  # MoETransformer
    tokenizer: Any  # tokenizers.Tokenizer
    generation: dict[str, Any]
    tokenizer_sha256: str  # of the folder's tokenizer.json, byte for byte


def special_token_strings(tokenizer, special_ids: dict[str, int]) -> dict[str, str]:
    return {k: tokenizer.id_to_token(v) for k, v in special_ids.items() if v is not None}


def write_hf_folder(
    model, tokenizer_file: str | Path, out_dir: str | Path, special_ids: dict[str, int]
) -> Path:
    """Write the folder; ``special_ids`` maps ``bos``/``eos``/``pad`` to token ids."""
    from tokenizers import Tokenizer

    from moe_model.hf import save_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_hf(model, out, extra_config={f"{k}_token_id": v for k, v in special_ids.items()})
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    names = special_token_strings(Tokenizer.from_file(str(out / "tokenizer.json")), special_ids)
    tokens = {f"{k}_token": v for k, v in names.items()}
    _write_json(out / "special_tokens_map.json", tokens)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.config.max_seq_len,
            **tokens,
        },
    )
    _write_json(
        out / "generation_config.json",
        {
            **{f"{k}_token_id": v for k, v in special_ids.items()},
            "do_sample": False,
            "max_length": model.config.max_seq_len,
        },
    )
    return out


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def resolve_model(uri: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local folder for ``uri`` while the ``with`` block runs: a folder as is, else an
    MLflow download into a temporary folder that is deleted when the block ends.

    ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/ID/model`` and any
    artifact URI MLflow can read are accepted.
    """
    local = Path(uri)
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        if not local.is_dir():
            raise JobError(f"model folder not found: {uri}")
        yield local
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    # One progress bar per file on stderr says nothing for a handful of files.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="moe-model-") as dst:
        try:
            source = _registry_source(uri, tracking_uri) if uri.startswith("models:/") else uri
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri
            )
        except MlflowException as e:
            raise JobError(f"cannot load model {uri}: {e.message.splitlines()[0]}") from None
        yield Path(path)


def _registry_source(uri: str, tracking_uri: str | None) -> str:
    """Where ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` keeps its files, asked of
    the registry at ``tracking_uri``. MLflow's own resolution of ``models:/`` (3.x,
    ``ModelsArtifactRepository._get_model_uri_infos``) asks the default registry, i.e.
    ``$MLFLOW_TRACKING_URI``, whatever ``tracking_uri`` says."""
    from mlflow import MlflowClient

    ref = uri.removeprefix("models:/").strip("/")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = ref.rpartition("/")
    return client.get_model_version_download_uri(name, version)


def load_hf_folder(folder: str | Path) -> LoadedModel:
    from tokenizers import Tokenizer

    from moe_model.hf import load_hf

    folder = Path(folder)
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if missing:
        raise JobError(f"{folder} is not a model folder: missing {', '.join(missing)}")
    try:
        model = load_hf(folder)
    except (ValueError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(f"cannot load model from {folder}: {first}") from None
    model.eval()
    gen_file = folder / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    tok_bytes = (folder / "tokenizer.json").read_bytes()
    return LoadedModel(
        model, Tokenizer.from_str(tok_bytes.decode("utf-8")), generation,
        hashlib.sha256(tok_bytes).hexdigest(),
    )  # fmt: skip


def load_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """The model in memory; a downloaded copy is deleted once it is loaded."""
    with resolve_model(uri, tracking_uri) as folder:
        return load_hf_folder(folder)


def export_folder(uri: str, out: str | Path, tracking_uri: str | None = None) -> Path:
    """Copy the model's files into ``out`` (new or empty), checking they form a model folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise JobError(f"--out {out}: folder is not empty")
    with resolve_model(uri, tracking_uri) as src:
        missing = [f for f in (*REQUIRED, "generation_config.json") if not (src / f).is_file()]
        if missing or not list(src.glob("*.safetensors")):
            raise JobError(
                f"{uri} is not a model folder: missing {', '.join(missing) or 'weights'}"
            )
        shutil.copytree(src, out, dirs_exist_ok=True)
    return out


def generate_text(
    loaded: LoadedModel, prompt: str, max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, seed: int | None = None,
) -> str:  # fmt: skip
    """The continuation of ``prompt`` (without the prompt), stopping at EOS."""
    import torch

    ids = loaded.tokenizer.encode(prompt).ids
    if not ids:
        raise JobError("--prompt: encodes to no tokens")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        seq = loaded.model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, eos_token_id=loaded.generation.get("eos_token_id"), generator=gen,
        )  # fmt: skip
    return loaded.tokenizer.decode(seq[0, len(ids) :].tolist())
