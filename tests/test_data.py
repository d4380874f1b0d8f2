"""Calibration text from lists, datasets and local files, read by ``datasets``' loaders."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from fair_calib_llmc.io.data import load_texts

pytestmark = pytest.mark.unit

TEXTS = ["first sample, with a comma", "second: sample", "third sample"]


@pytest.mark.parametrize("form", ["list", "datasets", "jsonl", "json", "csv", "txt"])
def test_every_form_gives_the_same_texts(tmp_path, form):
    files = {
        "jsonl": (
            "c.jsonl",
            "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)),
        ),
        "json": ("c.json", json.dumps([{"text": t} for t in TEXTS])),
        "csv": ("c.csv", "id,text\n" + "\n".join(f'{i},"{t}"' for i, t in enumerate(TEXTS))),
        "txt": ("c.txt", "\n\n".join(TEXTS) + "\n"),  # empty lines are not samples
    }
    if form == "list":
        data = TEXTS + ["  "]
    elif form == "datasets":
        data = Dataset.from_dict({"text": TEXTS})
    else:
        name, content = files[form]
        (tmp_path / name).write_text(content)
        data = tmp_path / name
    assert load_texts(data) == TEXTS


def test_missing_text_column_names_the_columns_and_the_flag(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": 1}) for t in TEXTS))
    with pytest.raises(
        ValueError, match=r"has no 'text' column \(columns: body, id\).*--text-column"
    ):
        load_texts(path)
    assert load_texts(str(path), text_column="body") == TEXTS
    with pytest.raises(ValueError, match="column 'id' .* holds int, not text"):
        load_texts(path, text_column="id")


def test_bad_paths_and_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such calibration file"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "c.docx").write_text("x")
    with pytest.raises(ValueError, match="unknown suffix '.docx'"):
        load_texts(tmp_path / "c.docx")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read calibration file"):
        load_texts(tmp_path / "bad.json")
    with pytest.raises(TypeError, match="unsupported calibration dataset type int"):
        load_texts(3)


def test_unreadable_files_say_why_and_what_to_pass(tmp_path):
    """datasets' own messages were empty (an empty .jsonl) or generic ("An error occurred
    while generating the dataset"); a directory was called "no such calibration file"."""
    cases = {
        "empty.jsonl": (b"", "is empty; pass a file with text (a JSON list of records"),
        "empty.txt": (b"\n \n", "is empty; pass a file with text (UTF-8 text, one sample"),
        "latin1.txt": ("caf\u00e9 cr\u00e8me\n".encode("latin-1"), "is not UTF-8 text"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*{expected}".replace("(", r"\(")):
            load_texts(tmp_path / name)
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory; pass one local"):
        load_texts(tmp_path / "data.jsonl")
