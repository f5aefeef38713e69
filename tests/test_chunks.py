"""Chunks compressed off HDF5's pipeline are exactly what the pipeline itself would store."""

import h5py
import numpy as np
import pytest
import zstandard

from circuits import chunks


def _pattern_like(rows: int) -> np.ndarray:
    """[example, layer, head, q, k] float16 rows, lower-triangular like attention patterns."""
    rng = np.random.default_rng(0)
    return np.tril(rng.random((rows, 2, 3, 16, 16))).astype(np.float16)


def test_rows_written_off_the_pipeline_read_back_with_plain_h5py(tmp_path):
    array = _pattern_like(10)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        dataset = f.create_dataset("x", shape=array.shape, dtype=array.dtype, chunks=(4, 1, 1, 16, 16),
                                   **chunks.PIPELINE)
        chunks.write_rows(dataset, 0, array[:8])
        chunks.write_rows(dataset, 8, array[8:])  # a short last block: a padded edge chunk
    with h5py.File(tmp_path / "x.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][:], array)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64, np.bool_])
def test_stored_chunks_hold_what_hdf5s_own_shuffle_zstd_pipeline_stores(tmp_path, dtype):
    array = (np.random.default_rng(1).standard_normal((9, 5, 7)) * 4).astype(dtype)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        ours = f.create_dataset("ours", shape=array.shape, dtype=array.dtype, chunks=(3, 5, 7), **chunks.PIPELINE)
        chunks.write_rows(ours, 0, array[:6])
        chunks.write_rows(ours, 6, array[6:])
        theirs = f.create_dataset("theirs", data=array, chunks=(3, 5, 7), **chunks.PIPELINE)
        for row in (0, 3, 6):
            (mask, ours_bytes), (_, theirs_bytes) = (d.id.read_direct_chunk((row, 0, 0)) for d in (ours, theirs))
            assert mask == 0  # every filter of the pipeline applied
            # the same shuffled bytes inside; ours adds zstd's frame checksum
            assert zstandard.decompress(ours_bytes) == zstandard.decompress(theirs_bytes)


def test_a_damaged_chunk_fails_to_read_instead_of_reading_wrong_numbers(tmp_path):
    array = _pattern_like(4)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        dataset = f.create_dataset("x", shape=array.shape, dtype=array.dtype, chunks=(4, 1, 1, 16, 16),
                                   **chunks.PIPELINE)
        chunks.write_rows(dataset, 0, array)
        offset = dataset.id.get_chunk_info(0).byte_offset
        size = dataset.id.get_chunk_info(0).size
    with open(tmp_path / "x.h5", "r+b") as raw:  # flip one bit in the middle of the first chunk
        raw.seek(offset + size // 2)
        byte = raw.read(1)[0]
        raw.seek(offset + size // 2)
        raw.write(bytes([byte ^ 0x10]))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        with pytest.raises(OSError):
            f["x"][0, 0, 0]
        np.testing.assert_array_equal(f["x"][0, 0, 1], array[0, 0, 1])  # other chunks intact


def test_byte_shuffle_matches_the_hdf5_shuffle_filter_layout():
    values = np.array([0x0102, 0x0304], dtype="<u2")
    assert chunks.byte_shuffle(values).tobytes() == bytes([0x02, 0x04, 0x01, 0x03])


def test_rows_not_on_a_chunk_boundary_are_refused(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        dataset = f.create_dataset("x", shape=(8, 4), dtype="f4", chunks=(4, 4), **chunks.PIPELINE)
        with pytest.raises(ValueError, match="align"):
            chunks.write_rows(dataset, 2, np.zeros((4, 4), "f4"))
        with pytest.raises(ValueError, match="partial chunk"):
            chunks.write_rows(dataset, 0, np.zeros((2, 4), "f4"))
