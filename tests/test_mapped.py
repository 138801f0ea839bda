"""Random-read memory maps of the layer store's .npy files, against numpy's own reader."""
import numpy as np
import pytest

from siglip_dola.retrieval.mapped import map_npy, prefetch


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.int8).reshape(4, 3, 2),
    np.linspace(-1, 1, 60, dtype=np.float16).reshape(5, 12),
    np.arange(10, dtype=np.uint64),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    np.zeros((0, 8), dtype=np.uint8),
])
def test_map_npy_reads_what_numpy_reads(tmp_path, array):
    path = tmp_path / "a.npy"
    np.save(path, array)
    mapped = map_npy(path)
    expected = np.load(path, allow_pickle=False)
    assert mapped.dtype == expected.dtype and mapped.shape == expected.shape and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, expected)
    if mapped.size and mapped.flags.c_contiguous:
        rows = np.array([0, len(mapped) - 1])
        prefetch([mapped], rows)  # advice only: the values read afterwards are the file's
        np.testing.assert_array_equal(mapped[rows], expected[rows])


def test_a_version_2_header_is_read(tmp_path):
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    with open(tmp_path / "v2.npy", "wb") as handle:
        np.lib.format.write_array(handle, array, version=(2, 0))
    np.testing.assert_array_equal(map_npy(tmp_path / "v2.npy"), array)


def test_truncated_and_pickled_files_are_refused(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(100, dtype=np.int64))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-8])
    with pytest.raises(TypeError):
        map_npy(tmp_path / "t.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects"):
        map_npy(tmp_path / "o.npy")
