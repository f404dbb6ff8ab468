"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM`` the file, the chat template, the stop tokens.

Ollama templates are Go templates, not the Jinja templates tokenizers carry. The tokenizer's own template is
rendered once with placeholder messages (a system and a user turn, then the generation prompt), and the placeholders
become ``{{ .System }}`` and ``{{ .Prompt }}``:

- a system part that only appears when a system message is given is wrapped in ``{{ if .System }}...{{ end }}``;
- a default system prompt the template inserts by itself (SmolLM2 does) becomes ``SYSTEM``;
- the stop tokens are the EOS token and the other special tokens the rendered template contains (turn markers such
  as ``<|im_start|>``/``<|im_end|>``), except BOS.

A template that renders neither placeholder (or a tokenizer without one) gives a Modelfile with ``FROM`` and stops
only; Ollama then reads the template from the GGUF metadata.
"""

from __future__ import annotations

import json
from typing import Any

SYSTEM, PROMPT = "\x00SYSTEM\x00", "\x00PROMPT\x00"


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception:  # noqa: BLE001 - any template error means: no template in the Modelfile
        return None


def go_template(tokenizer: Any) -> tuple[str | None, str | None]:
    """The Ollama ``TEMPLATE`` and default ``SYSTEM`` derived from the tokenizer's chat template (or ``None``s)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    both = _render(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}])
    alone = _render(tokenizer, [{"role": "user", "content": PROMPT}])
    if both is None or alone is None or both.count(SYSTEM) != 1 or both.count(PROMPT) != 1:
        return None, None
    head, rest = both.split(SYSTEM)
    between, tail = rest.split(PROMPT)
    before_prompt = alone.split(PROMPT)[0]
    go_tail = "{{ .Prompt }}" + tail
    if before_prompt.startswith(head) and before_prompt.endswith(between) and len(before_prompt) > len(head):
        default = before_prompt[len(head) : len(before_prompt) - len(between)]  # a system prompt of its own
        return head + "{{ .System }}" + between + go_tail, default or None
    if between.endswith(before_prompt):  # the system block disappears without a system message
        system_part = head + "{{ .System }}" + between[: len(between) - len(before_prompt)]
        return "{{ if .System }}" + system_part + "{{ end }}" + before_prompt + go_tail, None
    return head + "{{ .System }}" + between + go_tail, None


def stop_tokens(tokenizer: Any, template: str | None) -> list[str]:
    """EOS plus the special tokens that occur in the rendered template, BOS excepted."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if template:
        for token in tokenizer.all_special_tokens:
            if token and token != tokenizer.bos_token and token in template and token not in stops:
                stops.append(token)
    return stops


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_name: str, tokenizer: Any) -> str:
    """The Modelfile text for ``gguf_name`` (a file in the same folder) and the run's tokenizer."""
    template, system = go_template(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    if template:
        lines.append(f"TEMPLATE {_quote(template)}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += ["PARAMETER stop " + json.dumps(stop) for stop in stop_tokens(tokenizer, template)]
    return "\n".join(lines) + "\n"
