"""Model cards for trained / moderated pipelines, built offline (no Hub call) and tagged like diffusers' cards."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

TAGS = ["diffusers-msgm", "msgm", "machine-unlearning", "score-based-generative-models", "unconditional-image-generation"]


#: flags whose value must never reach a model card (cards are pushed to the Hub with the model)
SECRET_FLAGS = ("--hub_token",)


def redact_secrets(words: Sequence[str]) -> list[str]:
    """``words`` with the values of :data:`SECRET_FLAGS` (``--hub_token X`` or ``--hub_token=X``) replaced by ``***``."""
    out: list[str] = []
    hide_next = False
    for word in words:
        flag, eq, _ = word.partition("=")
        if hide_next:
            out.append("***")
            hide_next = False
        elif flag in SECRET_FLAGS and eq:
            out.append(f"{flag}=***")
        else:
            out.append(word)
            hide_next = word in SECRET_FLAGS
    return out


def command_line(argv: Sequence[str] | None = None, program: str = "") -> str:
    """The command that ran, quoted for a shell, secrets redacted: ``program`` + ``argv`` when ``argv`` is given
    (a script's ``main`` called with its own argument list), else this process's ``sys.argv``."""
    words = [*program.split(), *argv] if argv is not None else [sys.executable.rsplit("/", 1)[-1], *sys.argv]
    return " ".join(shlex.quote(a) for a in redact_secrets(words))


def training_metrics(last_logs: dict[str, Any]) -> dict[str, float]:
    """The final logged losses of a run (``loss``, ``retain_loss``, ``forget_loss``) as model-card metrics."""
    names = {"loss": "final training loss", "retain_loss": "final retain loss", "forget_loss": "final forget loss"}
    return {label: float(last_logs[key]) for key, label in names.items() if key in last_logs}


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_model_card(
    title: str,
    base_model: str | None,
    facts: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    repo_id: str | None = None,
    command: str | None = None,
) -> ModelCard:
    """A card listing base model, forgotten concept, variant, steps, metrics and the exact command."""
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_format(value)} |" for key, value in facts.items()]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in metrics.items()]
    lines += ["", "## Command", "", "```bash", command or command_line(), "```", "", "## Use", "", "```python",
              "from diffusers_msgm import MSGMPipeline", "",
              f'pipe = MSGMPipeline.from_pretrained("{repo_id or "path/to/this/folder"}")',
              "images = pipe(batch_size=16, num_inference_steps=200).images", "```", "",
              "`MSGMPipeline.from_pretrained` accepts a local folder or a Hub repo id (`pip install diffusers-msgm`)."]
    data = ModelCardData(license="apache-2.0", library_name="diffusers", base_model=base_model, inference=False)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return populate_model_card(card, tags=list(TAGS))
