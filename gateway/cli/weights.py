"""`llm-gateway weights push MODEL`: copy a model's files into the weight store once, so that
engines stream them from there (vLLM's Run:ai streamer) instead of downloading from Hugging
Face at every launch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer

from gateway.config.reference import Catalog, ModelSpec, ReferenceError, load_reference
from gateway.config.settings import ConfigFileError, Settings, load_settings

weights = typer.Typer(help="The weight store: model files engines stream at launch.", no_args_is_help=True)


@dataclass(frozen=True)
class Pushed:
    key: str
    written: bool  # False: the store already had the same bytes


def destination(spec: ModelSpec, settings: Settings, override: str | None) -> str:
    """Where a model's files go: --to, else its `weights_uri`, else the store prefix + model id."""
    uri = override or spec.weights_uri
    if uri is None and settings.skypilot.weight_store:
        uri = f"{settings.skypilot.weight_store.rstrip('/')}/{spec.id}"
    if uri is None:
        raise ValueError(
            f"{spec.id} has no weights_uri and no skypilot.weight_store is set; give --to s3://..."
        )
    if urlparse(uri).scheme != "s3":
        raise ValueError(f"{uri}: only s3:// stores can be pushed to from here")
    return uri


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def push_dir(s3: Any, source: Path, uri: str) -> list[Pushed]:
    """Upload every file below `source` to `uri` (s3://bucket/prefix), skipping objects whose
    content is already there (same size and MD5), so a second push writes nothing."""
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    out = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        key = "/".join(part for part in (prefix, path.relative_to(source).as_posix()) if part)
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
            same = head["ContentLength"] == path.stat().st_size and head["ETag"].strip('"') == _md5(path)
        except s3.exceptions.ClientError:
            same = False
        if not same:
            s3.upload_file(str(path), bucket, key)
        out.append(Pushed(key=key, written=not same))
    return out


@weights.command("push")
def push(
    model: Annotated[str, typer.Argument(help="A model of the reference file with a local `path`.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="s3://bucket/prefix (default: the model's store).")
    ] = None,
) -> None:
    """Copy MODEL's local files into the weight store (credentials: the standard AWS chain)."""
    try:
        settings = load_settings(config)
        catalog = Catalog(load_reference(settings.model_reference))
    except (ConfigFileError, ReferenceError, ValueError) as exc:
        typer.echo(f"llm-gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    spec = catalog.resolve(model)
    if spec is None or spec.path is None:
        typer.echo(f"llm-gateway: {model} is not a model of the reference file with a local `path`", err=True)
        raise typer.Exit(2)
    try:
        uri = destination(spec, settings, to)
    except ValueError as exc:
        typer.echo(f"llm-gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    import boto3

    results = push_dir(boto3.client("s3"), Path(spec.path), uri)
    written = sum(r.written for r in results)
    typer.echo(f"{uri}: {written} of {len(results)} files written")
