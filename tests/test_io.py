"""Safe input reading and atomic output writing (onnx_pathwise.io)."""

from __future__ import annotations

import io as stdio
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from onnx_pathwise import io
from onnx_pathwise.errors import InputError, OutputError


def _forged_npy(path: Path, shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"") -> Path:
    buf = stdio.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    path.write_bytes(buf.getvalue() + data)
    return path


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.arange(5, dtype=np.int64),
    np.zeros((0, 3), np.float32),
    np.float32(3.5),
])
def test_npy_round_trip(tmp_path: Path, array: np.ndarray) -> None:
    np.save(tmp_path / "a.npy", array)
    got = io.load_array(tmp_path / "a.npy")
    assert got.dtype == np.asarray(array).dtype and got.shape == np.shape(array)
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable


def test_npz_single_array_and_named_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", whatever=np.ones(3))
    np.testing.assert_array_equal(io.load_array(tmp_path / "one.npz"), np.ones(3))
    np.savez_compressed(tmp_path / "x.npz", other=np.zeros(2), x=np.arange(4.0))
    np.testing.assert_array_equal(io.load_array(tmp_path / "x.npz"), np.arange(4.0))
    np.savez(tmp_path / "inputs.npz", other=np.zeros(2), inputs=np.arange(3.0))
    np.testing.assert_array_equal(io.load_array(tmp_path / "inputs.npz"), np.arange(3.0))


def test_npz_ambiguous_keys_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.ones(2))
    with pytest.raises(InputError, match=r"two\.npz.*2 arrays.*'x' or 'inputs'"):
        io.load_array(tmp_path / "two.npz")


def test_format_is_read_from_content_not_name(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones(2))
    (tmp_path / "a.npy").rename(tmp_path / "data.bin")
    np.testing.assert_array_equal(io.load_array(tmp_path / "data.bin"), np.ones(2))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(0)
    (tmp_path / "random.npy").write_bytes(rng.bytes(500))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "folder.npy").mkdir()
    np.save(tmp_path / "object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    np.save(tmp_path / "struct.npy", np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(tmp_path / "complex.npy", np.zeros(2, np.complex64))
    np.save(tmp_path / "good.npy", np.ones((4, 8), np.float32))
    good = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "cut_data.npy").write_bytes(good[:-10])
    (tmp_path / "cut_header.npy").write_bytes(good[:40])
    (tmp_path / "trailing.npy").write_bytes(good + b"\0" * 16)
    np.savez(tmp_path / "good.npz", x=np.ones((4, 8), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:200])
    np.savez(tmp_path / "object.npz", x=np.array([None], dtype=object))
    with zipfile.ZipFile(tmp_path / "emptyzip.npz", "w"):
        pass
    _forged_npy(tmp_path / "huge.npy", (10**6, 10**6), data=b"\0" * 64)
    _forged_npy(tmp_path / "liar.npy", (1000, 8), data=b"\0" * 64)
    return {
        "missing": (tmp_path / "nope.npy", "no such file"),
        "directory": (tmp_path / "folder.npy", "is a directory"),
        "empty": (tmp_path / "empty.npy", "empty file"),
        "random": (tmp_path / "random.npy", "not a .npy or .npz"),
        "raw pickle": (tmp_path / "pickle.npy", "not a .npy or .npz"),
        "object": (tmp_path / "object.npy", "Python objects"),
        "object npz": (tmp_path / "object.npz", "Python objects"),
        "strings": (tmp_path / "strings.npy", "not numeric"),
        "structured": (tmp_path / "struct.npy", "structured dtype"),
        "complex": (tmp_path / "complex.npy", "not numeric"),
        "truncated data": (tmp_path / "cut_data.npy", "truncated"),
        "truncated header": (tmp_path / "cut_header.npy", "truncated"),
        "trailing bytes": (tmp_path / "trailing.npy", "unexpected bytes"),
        "truncated npz": (tmp_path / "cut.npz", "truncated"),
        "empty npz": (tmp_path / "emptyzip.npz", "no arrays"),
        "forged huge shape": (tmp_path / "huge.npy", "more than the limit"),
        "forged shape": (tmp_path / "liar.npy", "truncated"),
    }


BAD_CASES = [
    "missing", "directory", "empty", "random", "raw pickle", "object", "object npz", "strings",
    "structured", "complex", "truncated data", "truncated header", "trailing bytes",
    "truncated npz", "empty npz", "forged huge shape", "forged shape",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_files_refused_with_name_and_cause(tmp_path: Path, case: str) -> None:
    path, cause = _bad_files(tmp_path)[case]
    with pytest.raises(InputError) as info:
        io.load_array(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert cause in message, message
    assert "\n" not in message


def test_every_bad_file_is_a_case(tmp_path: Path) -> None:
    assert sorted(_bad_files(tmp_path)) == sorted(BAD_CASES)


def test_size_limit_checked_before_allocating(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones(100, np.float64))
    with pytest.raises(InputError, match="more than the limit of 799"):
        io.load_array(tmp_path / "a.npy", max_bytes=799)
    assert io.load_array(tmp_path / "a.npy", max_bytes=800).shape == (100,)


# --------------------------------------------------------------------------- writing


def test_save_npz_is_readable_by_numpy_without_pickle(tmp_path: Path) -> None:
    arrays = {"weight": np.ones((2, 3, 4), np.float32), "delta": np.zeros(2)}
    path = io.save_npz(tmp_path / "out.npz", arrays)
    assert path == tmp_path / "out.npz"
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["delta", "weight"]
        np.testing.assert_array_equal(data["weight"], arrays["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_save_npz_keeps_the_exact_name(tmp_path: Path) -> None:
    io.save_npz(tmp_path / "result", {"a": np.ones(1)})
    assert (tmp_path / "result").is_file() and not (tmp_path / "result.npz").exists()


def test_save_npz_refuses_object_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="object"):
        io.save_npz(tmp_path / "o.npz", {"a": np.array([None], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_write_json_is_strict(tmp_path: Path) -> None:
    obj = {"a": np.float32(1.5), "b": np.arange(3), "inf": float("inf"), "nan": np.nan,
           "path": tmp_path, "flag": np.bool_(True), "shape": (1, 2)}
    io.write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": 1.5, "b": [0, 1, 2], "inf": None, "nan": None,
                                "path": str(tmp_path), "flag": True, "shape": [1, 2]}
    assert "Infinity" not in text and "NaN" not in text


def test_write_bytes_and_permissions(tmp_path: Path) -> None:
    io.write_bytes(tmp_path / "b.bin", b"hello")
    assert (tmp_path / "b.bin").read_bytes() == b"hello"
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("writer", [
    lambda p: io.save_npz(p, {"a": np.ones(2)}),
    lambda p: io.write_json(p, {"a": 1}),
    lambda p: io.write_bytes(p, b"x"),
])
def test_writers_refuse_missing_folder_and_directory(tmp_path: Path, writer) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        writer(tmp_path / "missing" / "out")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        writer(tmp_path / "dir")
    assert not (tmp_path / "missing").exists()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.npz"
    target.write_bytes(b"old")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(npy_format, "write_array", broken)
    with pytest.raises(OutputError, match="No space left"):
        io.save_npz(target, {"a": np.ones(3)})
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]


def test_interrupted_write_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(npy_format, "write_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_npz(tmp_path / "out.npz", {"a": np.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_long_numeric_arrays_round_trip_through_the_compact_json_path() -> None:
    """Long int/float arrays take the one-call encoder; the text reads back as the same values,
    non-finite floats still become null, nested arrays keep their shape, strings stay escaped."""
    import json

    from onnx_pathwise.io import to_json

    ints = np.arange(1000, dtype=np.int64) * 7 - 3
    floats = np.linspace(-1, 1, 300)
    with_nan = np.r_[np.ones(100), np.nan]
    obj = {"kept": ints, "f": floats, "nan": with_nan, "m": np.arange(200).reshape(20, 10), "flags": np.ones(70, bool),
           "name": "@@compact-0000000000000000-0@@\x1b"}
    text = to_json(obj)
    back = json.loads(text)
    assert back["kept"] == ints.tolist() and back["f"] == floats.tolist()
    assert back["nan"][:100] == [1.0] * 100 and back["nan"][100] is None
    assert back["m"] == np.arange(200).reshape(20, 10).tolist() and back["flags"] == [True] * 70
    assert back["name"] == "@@compact-0000000000000000-0@@\x1b" and "\x1b" not in text
    assert "NaN" not in text
