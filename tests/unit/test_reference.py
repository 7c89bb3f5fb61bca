from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config.reference import Catalog, ReferenceError, load_reference, parse_reference, valid_model_id


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "ref.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_old_format_is_accepted_with_defaults(tmp_path: Path) -> None:
    specs = load_reference(
        write(tmp_path, {"org/big": {"gpus_per_replica": 2, "priority": 1}, "org/small": {}})
    )
    assert specs["org/big"].gpus_per_replica == 2 and specs["org/big"].priority == 1
    small = specs["org/small"]
    assert (small.gpus_per_replica, small.priority, small.kind, small.keep_hot_seconds) == (
        1,
        0,
        "chat",
        None,
    )


def test_optional_fields(tmp_path: Path) -> None:
    specs = load_reference(
        write(
            tmp_path,
            {
                "m": {
                    "engine_args": "--dtype float32 --x 'a b'",
                    "max_model_len": 128,
                    "path": "weights/m",
                    "accelerators": ["A100", "H100"],
                    "kind": "embedding",
                    "keep_hot_seconds": 30,
                },
                "ext": {"endpoint": "http://10.0.0.1:8000/v1/"},
            },
        )
    )
    m = specs["m"]
    assert m.engine_args == ("--dtype", "float32", "--x", "a b")
    assert m.engine_argv()[-2:] == ("--max-model-len", "128")
    assert m.path == str((tmp_path / "weights/m").resolve())
    assert m.accelerators == ("A100", "H100") and m.kind == "embedding" and m.keep_hot_seconds == 30
    assert specs["ext"].endpoint == "http://10.0.0.1:8000" and specs["ext"].external


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"gpus_per_replica": 0}, "gpus_per_replica"),
        ({"gpus_per_replica": "two"}, "gpus_per_replica"),
        ({"priority": -1}, "priority"),
        ({"kind": "image"}, "kind"),
        ({"gpus_per_replicas": 2}, "gpus_per_replicas"),  # a typo is an error, not ignored
        ({"endpoint": "ftp://x"}, "endpoint"),
    ],
)
def test_bad_entry_names_file_model_and_field(tmp_path: Path, entry: dict, field: str) -> None:
    path = write(tmp_path, {"good": {}, "org/bad": entry})
    with pytest.raises(ReferenceError) as info:
        load_reference(path)
    message = str(info.value)
    assert str(path) in message and "'org/bad'" in message and f"'{field}'" in message


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ReferenceError, match="line 1 column"):
        load_reference(write(tmp_path, "{oops"))
    with pytest.raises(ReferenceError, match="cannot read"):
        load_reference(tmp_path / "missing.json")
    with pytest.raises(ReferenceError, match="JSON object"):
        parse_reference([1], source="x")
    with pytest.raises(ReferenceError, match="'bad id'"):
        parse_reference({"bad id": {}}, source="x")


def test_model_id_validation() -> None:
    for ok in ["tiny-llama", "org/model-7B", "meta-llama/Llama-3.1-8B-Instruct", "a.b_c"]:
        assert valid_model_id(ok), ok
    for bad in ["", "../x", "a/../b", "a b", "a;b", "a/b/c", "/a", "a" * 200, "mödel", "$(x)", "a'b"]:
        assert not valid_model_id(bad), bad


def test_catalog_unlisted() -> None:
    specs = parse_reference({"m": {"priority": 1}}, source="x")
    assert Catalog(specs).resolve("other") is None
    catalog = Catalog(specs, allow_unlisted=True)
    assert catalog.resolve("m") is specs["m"]
    other = catalog.resolve("org/other")
    assert other is not None and other.gpus_per_replica == 1 and other.priority == 0
    assert catalog.resolve("../x") is None


def test_shipped_reference_file_is_valid() -> None:
    specs = load_reference(Path(__file__).parents[2] / "model_reference.json")
    assert "tiny-llama" in specs
