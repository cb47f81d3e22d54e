"""The one JSON Schema of gapcam's JSON (gapcam.schema): real ``gapcam localize --json``
documents and web answers validate against it, wrong ones do not, and docs/json.md shows it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import EXAMPLES
from fastapi.testclient import TestClient

from gapcam import cli, schema
from gapcam.localizer import Localizer
from gapcam.web.app import create_app
from gapcam.web.schemas import LOCALIZE_ANSWER

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "json.md"
VALIDATOR = jsonschema.Draft202012Validator(schema.localize_schema())


def docs_blocks() -> list[str]:
    """The ```json blocks of docs/json.md: the example, a video's entry, then the schema."""
    return re.findall(r"^```json\n(.*?)\n```$", DOCS.read_text(encoding="utf-8"), re.S | re.M)


def problems(document: Any, validator: jsonschema.Validator = VALIDATOR) -> list[str]:
    return sorted(f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document))


def localize_json(tmp_path: Path, *options: str) -> dict[str, Any]:
    """``gapcam localize`` on cat.png and a broken file, in process: its --json document."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    target = tmp_path / "run.json"
    argv = ["localize", str(EXAMPLES / "cat.png"), str(broken), "--out", str(tmp_path / "out")]
    code = cli.main([*argv, "--json", str(target), "--backend", "eager", "-q", *options])
    assert code == 1  # the broken file
    return json.loads(target.read_text(encoding="utf-8"))


def test_schemas_are_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(schema.localize_schema())
    jsonschema.Draft202012Validator.check_schema(LOCALIZE_ANSWER)
    entry = schema.localize_schema()["properties"]["results"]["items"]
    assert (entry["then"], entry["else"]) == (schema.VIDEO, schema.RESULT)


def test_localize_json_top_k_validates(tmp_path: Path) -> None:
    document = localize_json(tmp_path, "--top-k", "2", "--save-cam")
    assert problems(document) == []
    assert document["schema"] == schema.LOCALIZE_FORMAT
    assert (document["settings"]["top_k"], document["settings"]["classes"]) == (2, None)
    (result,) = document["results"]
    assert [m["index"] for m in result["maps"]] == [285, 282]  # Egyptian cat, tiger cat
    assert {"overlay", "cam_npy"} <= result.keys()
    (error,) = document["errors"]
    assert error["input"] == str(tmp_path / "broken.jpg")


def test_localize_json_with_classes_and_views_validates(tmp_path: Path) -> None:
    options = ["--class", "285", "--class", "tabby", "--hflip", "--no-overlay"]
    document = localize_json(tmp_path, *options)
    assert problems(document) == []
    settings = document["settings"]
    assert (settings["classes"], settings["top_k"]) == ([285, 281], None)
    assert (settings["hflip"], settings["scales"]) == (True, [1.0])
    (result,) = document["results"]
    assert [m["index"] for m in result["maps"]] == [285, 281]
    assert "overlay" not in result


def test_web_answer_validates_against_its_openapi_schema(localizer: Localizer) -> None:
    client = TestClient(create_app(localizer))
    served = client.get("/openapi.json").json()
    operation = served["paths"]["/api/localize"]["post"]
    ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    body_schema = served["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body_schema == {**LOCALIZE_ANSWER, "title": "LocalizeBody"}
    files = {"file": ("cat.png", (EXAMPLES / "cat.png").read_bytes(), "image/png")}
    answer = client.post("/api/localize", params={"preview": 64}, files=files).json()
    validator = jsonschema.Draft202012Validator(body_schema)
    assert problems(answer, validator) == []
    assert answer["maps"][0]["index"] == 285
    # the part it shares with a --json result entry is that entry's definition
    shared = {key: answer[key] for key in schema.RESULT_FIELDS["properties"]}
    for entry in shared["maps"]:
        del entry["map_png"]
    assert problems(shared, jsonschema.Draft202012Validator(schema.RESULT)) == []


def test_validator_rejects_wrong_types_missing_and_unknown_fields() -> None:
    example = json.loads(docs_blocks()[0])
    assert problems(example) == []  # the docs' example is a valid document

    def broken(change: Any) -> list[str]:
        document = copy.deepcopy(example)
        change(document)
        return problems(document)

    result = "['results', 0"
    assert broken(lambda d: d["results"][0].update(width="451")) == [
        f"{result}, 'width']: '451' is not of type 'integer'"
    ]
    assert broken(lambda d: d["results"][0].pop("maps")) == [
        f"{result}]: 'maps' is a required property"
    ]
    assert broken(lambda d: d["results"][0]["maps"][0]["boxes"][0].update(xyxy=[36, 0, 410])) == [
        f"{result}, 'maps', 0, 'boxes', 0, 'xyxy']: [36, 0, 410] is too short"
    ]
    assert broken(lambda d: d["settings"].update(colour="red")) == [
        "['settings']: Additional properties are not allowed ('colour' was unexpected)"
    ]
    assert broken(lambda d: d.update(schema="gapcam.localize/2")) == [
        "['schema']: 'gapcam.localize/1' was expected"
    ]


def test_docs_show_the_generated_schema() -> None:
    assert json.loads(schema.text()) == schema.localize_schema()  # the layout loses nothing
    _, video_entry, shown = docs_blocks()
    validator = jsonschema.Draft202012Validator(schema.VIDEO)
    assert problems(json.loads(video_entry), validator) == []
    assert shown == schema.text(), "docs/json.md: paste the output of `python -m gapcam.schema`"
