"""`moonforge import` and `moonforge export`: Hugging Face checkpoints in and out of the store.

Registered on the main app by flows/cli.py. Thin wiring over registry/hf_import.py and
registry/hf_export.py; errors print one paragraph and exit 1 like every other command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import typer
from rich.markup import escape

from moonforge.flows.cli import REF_HELP, _errors, _project, app, console

FORMAT_HELP = "Output format: table or json."


@app.command(name="import")
def import_(
    path: Path = typer.Argument(
        ...,
        help="A local Hugging Face checkpoint directory "
        "(config.json + safetensors, optionally tokenizer.json).",
    ),
    name: str = typer.Option(
        "import", "--name", help="Store name of the import: refs become NAME@latest, NAME@1."
    ),
    format_: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """Import HF weights (deepseek_v3, kimi_vl, siglip, llama, qwen2) as a versioned artifact."""
    with _errors():
        from moonforge.model.adapters.base import InteropError
        from moonforge.registry.hf_import import import_checkpoint
        from moonforge.registry.store import open_store
        from moonforge.stages.stage_configs import STAGE_CONFIGS

        try:
            res = import_checkpoint(
                path, open_store(_project()), name, _project(), reserved=tuple(STAGE_CONFIGS)
            )
        except InteropError as e:
            from moonforge.flows.cli import err_console

            err_console.print(
                f"[bold red]import error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None
        tok = json.loads((res.info.path / "import.json").read_text()).get("tokenizer")
        row = {
            "ref": res.info.ref,
            "fingerprint": res.info.fingerprint,
            "model_type": res.model_type,
            "parts": list(res.parts),
            "cache_hit": res.cache_hit,
            "path": str(res.info.path),
            "tokenizer": tok,
            "notes": list(res.notes),
        }
        if format_ == "json":
            typer.echo(json.dumps(row, indent=2))
            return
        verb = "already imported as" if res.cache_hit else "imported as"
        console.print(
            f"{path} ({res.model_type}: {', '.join(res.parts)}) {verb} "
            f"[bold]{res.info.ref}[/] (fp {res.info.fingerprint[:12]})",
            highlight=False,
        )
        if tok:
            added = ", ".join(tok["added_tokens"]) or "none"
            console.print(
                f"tokenizer: {tok['vocab_size']} tokens ({tok['dialect']} dialect); "
                f"added {added}; embedding rows grown by {tok['embedding_rows_grown']}",
                highlight=False,
            )
        for note in res.notes:
            console.print(f"note: {note}", style="dim", highlight=False)


@app.command()
def export(
    ref: str = typer.Argument(..., help="The artifact to export: " + REF_HELP),
    out: Path = typer.Argument(..., help="Output directory (must be empty or absent)."),
    format_: str = typer.Option("hf", "--format", help="Checkpoint format: hf."),
    part: str = typer.Option(
        "lm", "--part", help="lm: transformers-native causal LM; vlm: the whole VLM in the Kimi-VL layout."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
    shard_gb: float = typer.Option(
        5.0, "--max-shard-gb", help="Shard size (GB) above which weights are split with an index."
    ),
) -> None:
    """Export an artifact as a Hugging Face checkpoint (safetensors, config, tokenizer, card)."""
    with _errors():
        from moonforge.model.adapters.base import InteropError
        from moonforge.registry.hf_export import Part, export_checkpoint
        from moonforge.registry.refs import resolve_ref
        from moonforge.registry.store import open_store

        if format_ != "hf":
            raise typer.BadParameter(f"--format {format_!r}: only 'hf' is supported")
        if part not in ("lm", "vlm"):
            raise typer.BadParameter(f"--part {part!r}: use lm or vlm")
        store = open_store(_project())
        info = resolve_ref(ref, store, _project())
        try:
            res = export_checkpoint(
                info,
                out,
                store,
                _project(),
                part=cast(Part, part),  # one of ("lm", "vlm"), checked above
                force=force,
                max_shard_bytes=int(shard_gb * 1024**3),
            )
        except InteropError as e:
            from moonforge.flows.cli import err_console

            err_console.print(
                f"[bold red]export error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None
        console.print(f"{info.ref} -> {res.out} ({res.model_type}; {', '.join(res.files)})", highlight=False)
        if res.tokenizer is None:
            console.print("note: no tokenizer is recorded for this artifact; none was written", style="dim")
