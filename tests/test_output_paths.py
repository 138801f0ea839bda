"""Outputs never destroy data (issue #26, 1): every writer goes through siglip_dola.io.atomic_path, which writes
THROUGH a target that is not a regular file (device node, FIFO) instead of replacing it, follows symlinks,
names the asked file in its errors; commands refuse an output that is also an input or another output."""
import errno
import json
import os
import stat
import threading

import pytest
from cli_run import run

from siglip_dola import io


def _device_copy(tmp_path, name: str, source: str):
    """A character device with the major/minor of `source` (/dev/null, /dev/full), made in tmp (root only)."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root (the FIFO tests cover the class without it)")
    node = tmp_path / name
    os.mknod(node, 0o666 | stat.S_IFCHR, os.stat(source).st_rdev)
    return node


def _is_char_device(path) -> bool:
    return stat.S_ISCHR(os.lstat(path).st_mode)


RESULT = {"dataset": "shapes", "model": "embedded", "task": "zeroshot_classification", "metrics": {"acc1": 0.5}}


def test_a_device_node_is_written_through_never_replaced(tmp_path):
    null = _device_copy(tmp_path, "null", "/dev/null")
    io.write_json_atomic(null, {"x": 1})
    with io.atomic_path(null) as tmp:
        tmp.write_bytes(b"bytes")
    assert _is_char_device(null)
    assert not [p for p in tmp_path.iterdir() if p.name != "null"]  # no temp file left beside it
    (tmp_path / "stdout").symlink_to(null)  # as /dev/stdout is a link to the process's output
    io.write_text_atomic(tmp_path / "stdout", "through the link")
    assert (tmp_path / "stdout").is_symlink() and _is_char_device(null)


def test_a_write_error_names_the_asked_file_not_the_temp_file(tmp_path):
    full = _device_copy(tmp_path, "full", "/dev/full")
    with pytest.raises(OSError) as raised:
        io.write_json_atomic(full, {"x": 1})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(full)
    assert _is_char_device(full)


def test_an_error_inside_the_writer_names_the_asked_file(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(OSError) as raised:
        with io.atomic_path(target) as tmp:
            raise OSError(errno.EIO, "Input/output error", str(tmp))
    assert raised.value.filename == str(target) and ".tmp" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_a_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    io.write_text_atomic(fifo, "through the pipe")
    reader.join(timeout=30)
    assert received == [b"through the pipe"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlink_stays_a_link_and_its_target_is_written(tmp_path):
    target = tmp_path / "real" / "calib.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    io.write_json_atomic(link, {"new": True})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text()) == {"new": True}


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError) as raised:
        io.write_text_atomic(tmp_path, "x")
    assert raised.value.filename == str(tmp_path)


def test_cli_build_and_report_write_into_a_device_copy(tmp_path, capsys):
    null = _device_copy(tmp_path, "null", "/dev/null")
    result = tmp_path / "r.json"
    result.write_text(json.dumps(RESULT))
    code, _, err = run(capsys, "build", result, "--out", null)
    assert code == 0, err
    assert _is_char_device(null)
    full = _device_copy(tmp_path, "full", "/dev/full")
    code, _, err = run(capsys, "build", result, "--out", full)
    assert code == 2 and str(full) in err and ".tmp" not in err and "Traceback" not in err
    assert _is_char_device(full)


def test_cli_build_through_a_symlink(tmp_path, capsys):
    result = tmp_path / "r.json"
    result.write_text(json.dumps(RESULT))
    (tmp_path / "table.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to(tmp_path / "table.csv")
    assert run(capsys, "build", result, "--out", tmp_path / "link.csv")[0] == 0
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "table.csv").read_text().startswith("dataset")


def test_an_output_that_is_an_input_is_refused_before_anything_runs(tmp_path, capsys):
    result = tmp_path / "r.json"
    result.write_text(json.dumps(RESULT))
    before = result.read_text()
    code, _, err = run(capsys, "build", result, "--out", result)
    assert code == 2 and "--out" in err and result.read_text() == before
    code, _, err = run(capsys, "build", tmp_path, "--out", result)  # a folder holding the output
    assert code == 2 and result.read_text() == before
    (tmp_path / "alias.json").symlink_to(result)
    code, _, err = run(capsys, "report", result, tmp_path / "p.jsonl", "--out", tmp_path / "alias.json")
    assert code == 2 and "also the input" in err and result.read_text() == before


@pytest.mark.parametrize("extra", [["--predictions", "{out}"], ["--report", "{out}"],
                                   ["--predictions", "{alias}"]])
def test_eval_refuses_two_outputs_that_are_one_file(tmp_path, capsys, extra):
    out = tmp_path / "x.html"
    out.write_text("keep")
    (tmp_path / "alias").symlink_to(out)
    argv = ["eval", "--dataset", "shapes", "--limit", "2", "--out", out,
            *[a.format(out=out, alias=tmp_path / "alias") for a in extra]]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "same file" in err and out.read_text() == "keep", err


def test_calibrate_refuses_writing_over_its_dataset(tmp_path, capsys):
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("path,label\na.png,x\n")
    code, _, err = run(capsys, "calibrate", "--dataset", csv_file, "--out", csv_file)
    assert code == 2 and "--dataset" in err and csv_file.read_text() == "path,label\na.png,x\n"


def test_shapes_export_keeps_an_existing_dataset(tmp_path, capsys):
    folder = tmp_path / "photos"
    assert run(capsys, "shapes", "export", folder, "--n", "5")[0] == 0
    labels = (folder / "labels.csv").read_text()
    code, _, err = run(capsys, "shapes", "export", folder, "--n", "2", "--seed", "1")
    assert code == 2 and "labels.csv" in err and "--overwrite" in err
    assert (folder / "labels.csv").read_text() == labels
    assert run(capsys, "shapes", "export", folder, "--n", "2", "--seed", "1", "--overwrite")[0] == 0
    assert len((folder / "labels.csv").read_text().splitlines()) == 3


def test_shapes_export_checks_its_size_before_writing(tmp_path, capsys):
    code, _, err = run(capsys, "shapes", "export", tmp_path / "huge", "--n", "99999999999999999999")
    assert code == 2 and "GB" in err and "Traceback" not in err
    assert not (tmp_path / "huge").exists()


def test_shapes_export_streams_one_image_at_a_time(tmp_path, monkeypatch):
    """No sample list is built: at most one drawn image exists at a time (make_split is not used)."""
    from siglip_dola.data import shapes

    monkeypatch.setattr(shapes, "make_split", lambda *a, **k: pytest.fail("export must not build the split"))
    shapes.export(tmp_path / "d", n=3)
    assert len(list((tmp_path / "d").glob("*.png"))) == 3
