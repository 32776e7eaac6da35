"""Model cards rendered from ``model_cards/`` templates with measured figures only."""
from __future__ import annotations

import json
import os
import platform
import re
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .errors import UsageError

TEMPLATE = "nfnet.md"


def check_license(license: str) -> None:
    """A license the Hub takes in a card's front matter: one of its lower-case identifiers (apache-2.0, mit,
    cc-by-4.0 ..., or other); it refuses the upload of a card with anything else."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        hint = f" (the Hub writes it {license.lower()!r})" if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", license) \
            else ""
        raise UsageError(f"license {license!r} is not a license identifier the Hub takes{hint}: give one of its "
                         "identifiers (apache-2.0, mit, cc-by-4.0 ..., https://huggingface.co/docs/hub/"
                         "repositories-licenses) or 'other', then name yours in the card")


def card_data(*, repo_id: str, license: str, dataset: str | None, metrics: dict[str, float] | None) -> ModelCardData:
    """The YAML front matter a Hub user expects, with model-index results when there are measurements."""
    results = None
    if metrics and dataset:
        results = [EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                              metric_type="accuracy", metric_name=f"top-{k}", metric_value=round(metrics[f"top{k}"], 2))
                   for k in (1, 5) if metrics.get(f"top{k}") is not None]
    return ModelCardData(library_name="timm", license=license, pipeline_tag="image-classification",
                         tags=["image-classification", "timm", "nfnet", "onnx", "nfnet-hub"],
                         datasets=[dataset] if dataset else None, model_name=repo_id, eval_results=results)


def template_path(name: str = TEMPLATE) -> Path:
    """The template in a source checkout (``model_cards/``), else the copy shipped in the package."""
    checkout = Path(__file__).resolve().parent.parent / "model_cards" / name
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("nfnet_hub.model_cards").joinpath(name)))


def render_card(fields: dict[str, Any], data: ModelCardData) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    return str(ModelCard.from_template(data, template_path=str(template_path()), machine=machine, **fields))


def card_for_repo(text: str, repo_id: str) -> tuple[str, str | None]:
    """A bundle's card as it must read in ``repo_id``, and the repository it was built for where that differs: the
    card names its repository (front matter, title, the code that loads it), so a bundle published elsewhere (the
    quickstart's, built for YOUR-ORG/...) would tell readers to load a repository that is not there."""
    built_for = ModelCard(text).data.model_name
    if not built_for or built_for == repo_id:
        return text, None
    text = text.replace(f"\n# {built_for.split('/')[-1]}\n", f"\n# {repo_id.split('/')[-1]}\n", 1)
    return text.replace(built_for, repo_id), built_for


def read_metrics(path: str) -> dict[str, float]:
    """``bundle --metrics``: measured accuracies for the card, a JSON object of numbers."""
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"no metrics file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON: {e}") from None
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise UsageError(f"{path} must hold a JSON object of numbers, e.g. {{\"top1\": 91.5, \"top5\": 99.0}}")
    return metrics
