"""Model cards for trained / moderated pipelines, built offline (no Hub call) and tagged like diffusers' cards."""

from __future__ import annotations

import shlex
import sys
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

TAGS = ["diffusers-msgm", "msgm", "machine-unlearning", "score-based-generative-models", "unconditional-image-generation"]


def command_line() -> str:
    """The command that is running, quoted so it can be pasted back into a shell."""
    return " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv])


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
