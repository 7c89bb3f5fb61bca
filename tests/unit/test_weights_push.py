"""`llm-gateway weights push`: a model's files into an S3 weight store (moto), once."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.cli.weights import destination, push_dir
from gateway.config.reference import ModelSpec
from gateway.config.settings import Settings


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="weights")
        yield client


def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"layers": 2}')
    (root / "sub" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return root


def test_push_writes_every_file_once(tmp_path: Path, s3) -> None:
    source = model_dir(tmp_path)
    first = push_dir(s3, source, "s3://weights/store/tiny")
    assert sorted((r.key, r.written) for r in first) == [
        ("store/tiny/config.json", True),
        ("store/tiny/sub/model.safetensors", True),
    ]
    body = s3.get_object(Bucket="weights", Key="store/tiny/sub/model.safetensors")["Body"].read()
    assert body == (source / "sub" / "model.safetensors").read_bytes()
    assert not any(r.written for r in push_dir(s3, source, "s3://weights/store/tiny"))  # nothing changed
    (source / "config.json").write_text('{"layers": 3}')
    assert [r.key for r in push_dir(s3, source, "s3://weights/store/tiny") if r.written] == [
        "store/tiny/config.json"
    ]


def test_destination_comes_from_the_model_or_the_store(tmp_path: Path) -> None:
    spec = ModelSpec(id="org/m")
    with_store = Settings(skypilot={"weight_store": "s3://weights/models/"}, data_dir=tmp_path)
    assert destination(spec, with_store, None) == "s3://weights/models/org/m"
    own = ModelSpec(id="org/m", weights_uri="s3://other/m")
    assert destination(own, with_store, None) == "s3://other/m"
    assert destination(spec, with_store, "s3://x/y") == "s3://x/y"
    with pytest.raises(ValueError, match="no weights_uri"):
        destination(spec, Settings(data_dir=tmp_path), None)
    with pytest.raises(ValueError, match="only s3://"):
        destination(spec, with_store, "gs://bucket/m")


def test_cli_push(tmp_path: Path, s3) -> None:
    source = model_dir(tmp_path)
    reference = tmp_path / "model_reference.json"
    reference.write_text(json.dumps({"tiny": {"path": str(source)}, "remote": {}}))
    config = tmp_path / "gateway.yaml"
    config.write_text(f"model_reference: {reference}\nskypilot:\n  weight_store: s3://weights/store\n")
    result = CliRunner().invoke(app, ["weights", "push", "tiny", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "s3://weights/store/tiny: 2 of 2 files written" in result.output
    refused = CliRunner().invoke(app, ["weights", "push", "remote", "--config", str(config)])
    assert refused.exit_code == 2 and "local `path`" in refused.output
