"""Inputs the user already has: folders (recursive, sorted, --glob), path lists, single images,
CSV/Parquet tables chosen by column name, labels; .npy/.npz exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import conv_model, feature_metadata, mlp_model, photo_folder, write_csv
from helpers import SAMPLES, runner

from onnx_pathwise import Explainer
from onnx_pathwise.cli import app
from onnx_pathwise.data import Sample, load_labels, open_inputs
from onnx_pathwise.errors import InputError, PathwiseError

NAMES = ["age", "income", "height", "weight"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _sources(src) -> list[str]:
    return [s.source for batch in src.batches() for s in batch]


def test_folder_is_recursive_sorted_and_globbed(tmp_path: Path) -> None:
    paths = photo_folder(tmp_path / "p")
    (tmp_path / "p" / "notes.txt").write_text("not an image, not listed")
    src = open_inputs(tmp_path / "p", (3, 16, 16), preprocess="unit", batch_size=4)
    rel = [Path(s).relative_to(tmp_path / "p").as_posix() for s in _sources(src)]
    assert rel == sorted(p.relative_to(tmp_path / "p").as_posix() for p in paths.values()) == sorted(rel)
    assert "sub/flower.png" in rel and len(src) == len(paths)
    assert src.kind == "image" and src.preprocessing is not None and src.preprocessing.name == "unit"
    only_jpg = open_inputs(tmp_path / "p", (3, 16, 16), glob="*.jpg")
    assert [Path(s).name for s in _sources(only_jpg)] == ["china.jpg", "rotated.jpg"]
    sub = open_inputs(tmp_path / "p", (3, 16, 16), glob="sub/*")
    assert [Path(s).name for s in _sources(sub)] == ["flower.png"]
    with pytest.raises(InputError, match="no image files matching --glob"):
        open_inputs(tmp_path / "p", (3, 16, 16), glob="*.gif")


def test_samples_carry_source_original_and_index(tmp_path: Path) -> None:
    photo_folder(tmp_path / "p")
    batch = next(iter(open_inputs(tmp_path / "p", (3, 24, 24), preprocess="imagenet", batch_size=2).batches()))
    s = batch[1]
    assert isinstance(s, Sample) and s.index == 1 and s.features is None
    assert s.array.dtype == np.float32 and s.array.shape == (3, 24, 24)
    assert s.original is not None and s.original.dtype == np.uint8 and s.original.shape == (24, 24, 3)


def test_list_file_paths_are_relative_to_it(tmp_path: Path) -> None:
    paths = photo_folder(tmp_path / "p")
    listing = tmp_path / "p" / "list.txt"
    listing.write_text("# two photos\nsub/flower.png\n\n" + str(paths["china"]) + "\n")
    src = open_inputs(listing, (3, 16, 16))
    assert _sources(src) == [str(paths["flower"]), str(paths["china"])]
    listing.write_text("missing.png\n")
    with pytest.raises(InputError, match="missing.png: no such file"):
        list(open_inputs(listing, (3, 16, 16)).batches())
    single = open_inputs(paths["grey"], (3, 16, 16))
    assert len(single) == 1 and _sources(single) == [str(paths["grey"])]


def test_csv_columns_by_name_in_the_models_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 4)).astype(np.float32)
    # the table's columns are in another order, with an extra one
    order = ["weight", "id", "age", "height", "income"]
    rows = [[r[NAMES.index(c)] if c in NAMES else f"row{i}" for c in order] for i, r in enumerate(x.tolist())]
    table = write_csv(tmp_path / "t.csv", order, rows)
    model = mlp_model(tmp_path / "m.onnx", metadata=feature_metadata(NAMES))
    ex = Explainer(model, device="cpu")
    src = open_inputs(table, ex, batch_size=3)
    samples = [s for b in src.batches() for s in b]
    np.testing.assert_array_equal(np.stack([s.array for s in samples]), x)
    assert samples[0].features == NAMES and samples[2].source == f"{table}[2]" and len(src) == 7
    # --columns names them explicitly (here the same order the model metadata gives)
    src2 = open_inputs(table, (4,), columns="age,income,height,weight")
    np.testing.assert_array_equal(src2.to_array(), x)
    with pytest.raises(InputError, match=r"missing column\(s\) 'bmi'"):
        open_inputs(table, (4,), columns=["age", "income", "height", "bmi"])
    with pytest.raises(InputError, match="choose them by name with --columns"):
        open_inputs(table, (4,))
    with pytest.raises(PathwiseError, match="3 column"):
        open_inputs(table, (4,), columns="age,income,height")


def test_csv_bad_cells(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "t.csv", NAMES, [[1, 2, 3, 4], [1, "n/a", 3, 4], [5, 6, 7, ""], [8, 9, 10, 11]])
    with pytest.raises(InputError, match=r"t.csv\[1\]: column 'income': 'n/a' is not a number"):
        open_inputs(table, (4,)).to_array()
    src = open_inputs(table, (4,), on_error="skip")
    np.testing.assert_array_equal(src.to_array(), [[1, 2, 3, 4], [8, 9, 10, 11]])
    assert [name for name, _ in src.skipped] == [f"{table}[1]", f"{table}[2]"]


def test_parquet_equals_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
    import pyarrow.parquet as pq

    x = np.random.default_rng(2).normal(size=(5, 4))
    pq.write_table(pa.table({n: x[:, NAMES.index(n)] for n in reversed(NAMES)}), tmp_path / "t.parquet")
    src = open_inputs(tmp_path / "t.parquet", (4,), columns=NAMES, batch_size=2)
    np.testing.assert_array_equal(src.to_array(), x.astype(np.float32))
    assert len(src) == 5


def test_arrays_as_before(tmp_path: Path) -> None:
    """explain on a .npy writes explanation.npz/json exactly as before (no shards)."""
    out = tmp_path / "o"
    res = invoke("explain", SAMPLES / "mlp.onnx", SAMPLES / "mlp_inputs.npy", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "explanation.npz"]
    src = open_inputs(SAMPLES / "mlp_inputs.npy", Explainer(SAMPLES / "mlp.onnx", device="cpu"))
    assert src.kind == "array" and _sources(src)[3].endswith("mlp_inputs.npy[3]")
    with pytest.raises(InputError, match="no such file"):
        open_inputs(tmp_path / "nope.npy", (8,))


def test_image_options_with_an_array_or_a_table_are_refused(tmp_path: Path) -> None:
    """Arrays and tables are used as they are: an image option given with one would be
    ignored, so every command refuses it with exit 2, naming the options, before reading
    anything or writing an output; without the options the same inputs run."""
    write_csv(tmp_path / "t.csv", NAMES, np.ones((3, 4)))
    array, table = SAMPLES / "mlp_inputs.npy", tmp_path / "t.csv"
    runs = [
        ("explain", SAMPLES / "mlp.onnx", array, "--out", tmp_path / "o"),
        ("explain", SAMPLES / "mlp.onnx", table, "--out", tmp_path / "o"),
        ("evaluate", SAMPLES / "mlp.onnx", array, "--out", tmp_path / "e"),
        ("audit", SAMPLES / "mlp.onnx", "--inputs", array),
        ("diff", SAMPLES / "mlp.onnx", SAMPLES / "mlp.onnx", "--inputs", array),
    ]
    for args in runs:
        res = invoke(*args, "--preprocess", "imagenet", "--mean", "0.5,0.5,0.5", "--device", "cpu")
        assert res.exit_code == 2, (args, res.output)
        assert "--preprocess, --mean apply to images" in res.output and "used as it is" in res.output, res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()
    res = invoke("explain", SAMPLES / "mlp.onnx", array, "--out", tmp_path / "o", "--device", "cpu")
    assert res.exit_code == 0, res.output
    for path in (array, table):  # the API's rule (open_inputs), the CLI's names the flags
        with pytest.raises(PathwiseError, match="preprocessing applies to images; .* used as it is"):
            open_inputs(path, (8,), preprocess="imagenet")


def test_labels(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("cat\ndog\nbird\n")
    (tmp_path / "l.json").write_text('["cat", "dog", "bird"]')
    (tmp_path / "m.json").write_text('{"2": "bird", "0": "cat", "1": "dog"}')
    (tmp_path / "gap.json").write_text('{"0": "cat", "2": "bird"}')
    for name in ("l.txt", "l.json", "m.json"):
        assert load_labels(tmp_path / name) == ["cat", "dog", "bird"]
    with pytest.raises(InputError, match="without gaps"):
        load_labels(tmp_path / "gap.json")
    assert load_labels(None, {"labels": '["a", "b"]'}) == ["a", "b"]
    assert load_labels(None, {"classes": "a,b,c"}) == ["a", "b", "c"]
    assert load_labels(None, {}) is None and load_labels(None, None) is None
    # everywhere: explain's JSON, the index rows; the model's metadata when no --labels
    model = mlp_model(tmp_path / "mm.onnx", metadata={"class_names": "low\nmid\nhigh"})
    x = np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = invoke("explain", model, tmp_path / "x.npy", "--out", tmp_path / "o1", "--device", "cpu")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o1" / "explanation.json").read_text())
    assert report["labels"] == ["low", "mid", "high"]
    assert all(s["label"] == ["low", "mid", "high"][s["target"]] for s in report["samples"])
    write_csv(tmp_path / "x.csv", NAMES, x)
    res = invoke("explain", model, tmp_path / "x.csv", "--out", tmp_path / "o2", "--device", "cpu",
                 "--labels", tmp_path / "l.txt")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "o2" / "index.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [["cat", "dog", "bird"][r["target"]] for r in rows]
    (tmp_path / "two.txt").write_text("a\nb\n")
    res = invoke("explain", model, tmp_path / "x.npy", "--out", tmp_path / "o3", "--labels", tmp_path / "two.txt")
    assert res.exit_code == 5 and "2 label(s), but the model has 3 classes" in res.output


def test_evaluate_audit_diff_take_a_folder(tmp_path: Path) -> None:
    photo_folder(tmp_path / "p")
    model = conv_model(tmp_path / "m.onnx", size=16)
    other = conv_model(tmp_path / "m2.onnx", size=16, seed=1)
    common = ["--preprocess", "unit", "--glob", "*.png", "--device", "cpu"]
    res = invoke("evaluate", model, tmp_path / "p", "--out", tmp_path / "e", "--methods", "pathwise,gradient", *common)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["n"] == 3 and result["input"]["preprocessing"]["preset"] == "unit"
    res = invoke("audit", model, "--inputs", tmp_path / "p", *common)
    assert res.exit_code in (0, 1) and "error" not in res.output, res.output
    res = invoke("diff", model, other, "--inputs", tmp_path / "p", "--json", tmp_path / "d.json", *common)
    assert res.exit_code in (0, 1) and json.loads((tmp_path / "d.json").read_text())["samples"], res.output
    res = invoke("audit", model, "--inputs", tmp_path / "p" / "nope")
    assert res.exit_code == 5 and "no such file or folder" in res.output


def test_input_shape_mismatch_is_one_line(tmp_path: Path) -> None:
    photo_folder(tmp_path / "p")
    res = invoke("explain", SAMPLES / "mlp.onnx", tmp_path / "p", "--out", tmp_path / "o", "--device", "cpu")
    assert res.exit_code == 5 and "is not an image" in res.output and "Traceback" not in res.output


def _finishes(fn, seconds: float = 20.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    import threading

    box: dict[str, BaseException | None] = {"exc": None}

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked on a read"
    return box["exc"]


def test_special_files_among_data_inputs_are_refused_not_read(tmp_path: Path) -> None:
    """A FIFO as a table, as a labels file, as a path list or as an image inside a folder is refused
    before it is opened for reading (a read would block forever)."""
    import os

    photo_folder(tmp_path / "p")
    os.mkfifo(tmp_path / "p" / "stuck.png")
    os.mkfifo(tmp_path / "rows.csv")
    os.mkfifo(tmp_path / "labels.txt")
    os.mkfifo(tmp_path / "list.txt")
    src = open_inputs(tmp_path / "p", (3, 16, 16), preprocess="unit", batch_size=64)
    exc = _finishes(lambda: list(src.batches()))
    assert isinstance(exc, InputError) and "stuck.png" in str(exc) and "FIFO" in str(exc)
    skipping = open_inputs(tmp_path / "p", (3, 16, 16), preprocess="unit", batch_size=64, on_error="skip")
    assert _finishes(lambda: list(skipping.batches())) is None
    for name in ("rows.csv", "list.txt"):
        exc = _finishes(lambda name=name: open_inputs(tmp_path / name, (4,)))
        assert isinstance(exc, InputError) and "FIFO" in str(exc), exc
    exc = _finishes(lambda: load_labels(tmp_path / "labels.txt", None))
    assert isinstance(exc, InputError) and "FIFO" in str(exc), exc
