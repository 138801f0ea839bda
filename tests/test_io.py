"""Atomic writes: the final file has the mode a plain open() gives (umask respected), for every writer."""
import os
import stat

import numpy as np
import pytest
import torch

from siglip_dola import io
from siglip_dola.cli import main


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _plain_open_mode(folder) -> int:
    """The mode a plain open(path, "w") gives a new file right now (the reference)."""
    probe = folder / "plain-open-probe"
    with open(probe, "w"):
        pass
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def _modes(folder) -> dict:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_atomic_helpers_give_plain_open_modes(tmp_path, umask):
    expected = _plain_open_mode(tmp_path)
    assert expected == 0o666 & ~umask
    io.write_json_atomic(tmp_path / "a.json", {"x": 1})
    io.write_text_atomic(tmp_path / "b.txt", "hi")
    with io.atomic_path(tmp_path / "c.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.zeros(3), allow_pickle=False)
    assert _modes(tmp_path) == {"a.json": expected, "b.txt": expected, "c.npy": expected}
    assert os.umask(umask) == umask  # the helper read the umask without changing it


def test_every_cli_writer_gives_plain_open_modes(tmp_path, capsys):
    """calibration + results JSON, plot PNGs, exported PNGs/CSVs, the index manifest, FAISS, segments, banks."""
    old = os.umask(0o027)
    try:
        expected = _plain_open_mode(tmp_path)
        common = ["--dataset", "shapes", "--limit", "12", "--no-progress", "--device", "cpu"]
        assert main(["calibrate", *common, "--split", "val", "--out", str(tmp_path / "out" / "calib.json")]) == 0
        assert main(["eval", *common, "--calibration", str(tmp_path / "out" / "calib.json"),
                     "--out", str(tmp_path / "out" / "result.json"), "--plots", str(tmp_path / "out" / "plots")]) == 0
        assert main(["shapes", "export", str(tmp_path / "out" / "imgs"), "--n", "3"]) == 0
        assert main(["index", "build", str(tmp_path / "out" / "imgs"), "--out", str(tmp_path / "out" / "idx"),
                     "--quiet", "--device", "cpu"]) == 0
        from siglip_dola.text_bank.bank import TextBank
        from siglip_dola.text_bank.files import save_text_bank
        bank = TextBank(["a", "b"], torch.eye(2, 4), "m")
        save_text_bank(bank, tmp_path / "out" / "bank.safetensors")
        save_text_bank(bank, tmp_path / "out" / "bank.npy")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    kinds = {name.rsplit(".", 1)[-1] for name in modes}
    assert {"json", "png", "csv", "txt", "faiss", "npy", "safetensors"} <= kinds
    assert any(name.startswith("plots/") for name in modes) and "idx/manifest.json" in modes
    assert {name: mode for name, mode in modes.items() if mode != expected} == {}
