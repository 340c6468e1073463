"""What keel may replace when it writes an output folder (issue 17, item 8), what a broken model
folder gives (item 9), and the review CSV's cells in a spreadsheet (item 10)."""

import csv
import json
import os

import pytest

from keel import io
from keel.errors import KeelError
from keel.label import LabelFiles, export_review, write_rows
from keel.label.review import spreadsheet_safe
from keel.models import init_model, load_model, save_model


@pytest.fixture(scope="module")
def tiny():
    return init_model("llama", layers=1, hidden=32, seed=0)


def build(tmp_path, name, files):
    tmp = tmp_path / f".build-{name}"
    tmp.mkdir()
    for f, text in files.items():
        (tmp / f).write_text(text)
    return tmp


def test_a_folder_keel_did_not_write_is_refused_and_kept(tmp_path, tiny):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(KeelError, match="is not a keel 'model' output") as e:
        save_model(*tiny, out)
    assert e.value.field == "overwrite"
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    save_model(*tiny, out, overwrite=True)  # asked for: replaced, nothing of the old left
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert io.output_kind(out) == "model"


def test_a_keel_output_of_the_same_kind_is_replaced_an_empty_folder_filled(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    save_model(*tiny, tmp_path / "empty")
    save_model(*tiny, tmp_path / "empty")  # its own earlier output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temp or old copies beside it
    with pytest.raises(KeelError, match="is not a keel 'onnx' output"):  # another kind is not replaced silently
        io.check_out_folder(tmp_path / "empty", "onnx")


def test_the_input_is_never_replaced_even_with_overwrite(tmp_path, tiny):
    model = save_model(*tiny, tmp_path / "m")
    for out in (model, tmp_path):  # the input itself, or a folder holding it
        for overwrite in (False, True):
            with pytest.raises(KeelError, match="would replace the input"):
                io.check_out_folder(out, "onnx", overwrite, inputs=(model,))
    io.check_out_folder(model / "onnx", "onnx", inputs=(model,))  # inside the input is fine


def test_the_old_folder_is_removed_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    io.publish_folder(build(tmp_path, "a", {"v": "old"}), out, "thing")
    seen = []
    real_rmtree = io.shutil.rmtree

    def watching_rmtree(path, *a, **k):
        seen.append((out / "v").read_text() if (out / "v").exists() else None)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(io.shutil, "rmtree", watching_rmtree)
    io.publish_folder(build(tmp_path, "b", {"v": "new"}), out, "thing")
    assert seen == ["new"]  # while the old copy was deleted, readers already saw the new one
    assert (out / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replacing_without_an_atomic_exchange_renames_the_old_aside_first(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # a system without renameat2
    out = tmp_path / "out"
    io.publish_folder(build(tmp_path, "a", {"v": "old"}), out, "thing")
    io.publish_folder(build(tmp_path, "b", {"v": "new"}), out, "thing")
    assert (out / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- broken model folders


def break_config(folder):
    (folder / "config.json").write_text("null")


def break_field(folder):
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = "four"
    (folder / "config.json").write_text(json.dumps(config))


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


@pytest.mark.parametrize("breaks, names", [(break_config, "config.json"), (break_field, "config.json"),
                                           (truncate_weights, "model.safetensors")])
def test_a_broken_model_folder_is_a_keel_error_naming_the_file(tmp_path, tiny, breaks, names):
    folder = save_model(*tiny, tmp_path / "m")
    breaks(folder)
    with pytest.raises(KeelError) as e:
        load_model(folder)
    assert str(folder / names) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- review CSV


def test_spreadsheet_safe_neutralises_formulas_only():
    for cell in ("=HYPERLINK(\"http://x\",\"y\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\t=1", "\r=1"):
        assert spreadsheet_safe(cell) == "'" + cell
    for cell in ("-3", "+2.5", "12", "x=3", "", None, 0.5):
        assert spreadsheet_safe(cell) == cell


def test_review_csv_cells_are_not_formulas(tmp_path):
    out = tmp_path / "labels.jsonl"
    write_rows(out, [{"question": "=1+1", "answer": "=HYPERLINK(\"http://evil\",\"2\")", "trace": "@cmd",
                      "method": "majority", "flagged": True, "flag_reason": "tie", "accepted": 1, "samples": 2,
                      "confidence": 0.5, "input_sha256": "a"}])
    assert LabelFiles.at(out).out == out
    export_review(out, tmp_path / "review.csv")
    with open(tmp_path / "review.csv", newline="") as f:
        (item,) = list(csv.DictReader(f))
    assert item["question"] == "'=1+1" and item["model_answer"].startswith("'=") and item["trace"] == "'@cmd"
    assert item["input_sha256"] == "a" and item["confidence"] == "0.5"
