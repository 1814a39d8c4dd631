"""``surgeon push DIR --repo ORG/NAME``: publish an output folder with a model card from surgeon.json."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import build, example
from surgeon.cli.console import emit_json, err, human_bytes, out

_CARD = {
    "surgeon.json": "README.md: model card built from surgeon.json",
    "kept": "README.md: the folder's own, kept (--overwrite-card replaces it with the card built from surgeon.json)",
    "none": "no surgeon.json and no README.md: the repo gets no model card",
}


@click.command(
    "push",
    epilog=example(
        "surgeon push ./merged --repo my-user/qwen2.5-vl-ties --dry-run",
        "surgeon push ./merged --repo my-user/qwen2.5-vl-ties --private",
        "surgeon push ./r1-prior --repo my-org/drift-prior --branch experiments -m 'prior from R1-distill'",
    ),
)
@click.argument("folder")
@click.option("--repo", required=True, metavar="ORG/NAME", help="Hub repo to publish to; created when missing.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", "--branch", "revision", default=None, metavar="BRANCH", help="Branch to commit to; created from main when missing (default: main).")
@click.option("--message", "-m", default=None, help="Commit message (default: names the surgeon command that made the folder).")
@click.option("--token", default=None, metavar="TOKEN", help="Hub token with write access (default: HF_TOKEN, then the `hf auth login` token). Never stored.")
@click.option("--dry-run", is_flag=True, help="Print the files with their sizes, the model card and what would be refused; send nothing.")
@click.option("--overwrite-card", is_flag=True, help="Replace a README.md in FOLDER by the card built from surgeon.json.")
@click.option(
    "--allow-file", multiple=True, metavar="PATTERN",
    help="Send files matching PATTERN (a glob on the path in FOLDER or the file name) although they look like credentials "
    "or hold key-shaped text; repeatable. The token in use is never sent.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(folder: str, as_json: bool, **options: object) -> None:
    """Upload FOLDER (the output of a surgeon command) to the Hub repo ORG/NAME.

    Writes the repo's README.md from the folder's surgeon.json: base models, method, settings,
    statistics and a loading snippet for what the folder holds. The folder itself is never
    changed, so a failed push can simply be run again. Every file is checked first, whole: a Hub
    token, an absolute local path in a text file, or a link to something outside FOLDER stops the
    push before anything is sent (--dry-run lists them all). surgeon's own records go up with
    local paths written as `local <name>`.
    """
    from surgeon.publish.push import PushConfig, push_folder

    config = build(PushConfig, options)
    result = push_folder(folder, config)
    if as_json:
        emit_json(result.to_dict())
        if result.refused:
            from surgeon.publish.push import refusal_error

            raise refusal_error(result.refused)
        return
    files = Table(title=f"{'would send' if config.dry_run else 'sent'} to {result.repo} ({result.revision})", title_justify="left")
    files.add_column("file")
    files.add_column("size", justify="right")
    for path, size in result.files:
        files.add_row(path, human_bytes(size))
    files.add_row(f"{len(result.files)} files", human_bytes(sum(n for _, n in result.files)), style="bold")
    out.print(files)
    out.print(_CARD[result.card_source], highlight=False)
    for note in result.notes:
        out.print(f"changed in the uploaded copy: {note}", highlight=False)
    if config.dry_run:
        if result.card is not None:
            out.print("\n" + result.card, markup=False, highlight=False)
        for path, problem in result.refused:
            out.print(f"refused: {path}: {problem}", highlight=False)
        err.print(f"dry run: nothing was sent (would publish to {result.url})", highlight=False)
        if result.refused:
            from surgeon.publish.push import refusal_error

            raise refusal_error(result.refused)
    else:
        out.print(f"pushed to {result.url}\ncommit {result.commit_url}", highlight=False)
