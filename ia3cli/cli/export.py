"""``ia3 export``: a run as one GGUF file for llama.cpp, Ollama and LM Studio (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ia3cli.cli.common import DebugOpt, errors, quiet_libraries

EXPORT_EXAMPLES = (
    "ia3 export runs/quickstart-causal qs.gguf            # GGUF base: replaced tensors keep the source's types",
    "ia3 export runs/quickstart-causal qs-q8.gguf --type q8_0",
    "ia3 export runs/llama-4bit out/llama.gguf --type f16  # Hugging Face base, trained in 4-bit",
    "ollama create qs -f qs.Modelfile && ollama run qs",
)


def export(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory from ia3 train.", show_default=False, metavar="RUN_DIR")
    ],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.", show_default=False, metavar="OUT.gguf")],
    type_name: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="f32, f16, bf16, q8_0, q4_1 or q4_0 for the folded weights (default: each source tensor's type, "
            "but q8_0 for 4-bit ones whose columns are scaled, or when the source type cannot be written; q8_0 for a "
            "Hugging Face base).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export at OUT.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Fold the IA3 vectors into a GGUF file for llama.cpp, Ollama and LM Studio; prove it reproduces the merged
    model; write OUT.export.json and an Ollama OUT.Modelfile beside it.

    A run on a GGUF base (model.gguf_file) keeps every other tensor, the metadata and the tokenizer of that file;
    a run on a Hugging Face base of the llama, mistral or qwen2 family is written whole.
    """
    with errors(debug):
        quiet_libraries(debug)
        from ia3cli.inference import export as exporting
        from ia3cli.report.console import Console

        console = Console()
        report = exporting.export(run_dir, out, type_name=type_name, force=force, printer=console.line)
        if report["probe_warning"]:
            console.line(f"warning: {report['probe_warning']}")
        typer.echo(
            f"exported to {out} ({report['bytes'] / 2**20:.1f} MiB; max |delta logits| {report['max_abs_diff']:.2e}, "
            f"greedy agreement {report['greedy_agreement']:.1%} on {report['probe_rows']} rows)"
        )
        typer.echo(f"next: ollama create NAME -f {exporting.outputs(out)['modelfile']}")
