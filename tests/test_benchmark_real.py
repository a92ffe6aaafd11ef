"""benchmark_real's splits of the real data: the test frames are never among the training or selection frames."""
import hashlib
import os

import numpy as np
import pytest

from benchmark_real import prepare
from conftest import SHARED_REAL
from data_files import list_frames, read_mask, read_tiff_2d

USIIGACI = os.path.join(SHARED_REAL, "usiigaci")
TRPL = os.path.join(SHARED_REAL, "trpL", "trpL_150310-11")
pytestmark = [pytest.mark.real]
needs_usiigaci = pytest.mark.skipif(not os.path.isdir(USIIGACI),
                                    reason=f"real sample not present at {USIIGACI} (../shared/real)")


def digests(root, sequence):
    return [hashlib.sha1(read_tiff_2d(f.image_path).tobytes()).hexdigest()
            for f in list_frames(root, sequence, with_masks=True)]


@needs_usiigaci
def test_usiigaci_split_interleaves_b_and_keeps_its_odd_frames_unseen(tmp_path):
    root = prepare(SHARED_REAL, "usiigaci", str(tmp_path))
    train, select, test = (digests(root, s) for s in "abc")
    assert (len(train), len(select), len(test)) == (30, 4, 11)
    sources = {s: digests(USIIGACI, s) for s in "ab"}
    assert test == sources["b"][1::2] and select == sources["a"][18:22]
    assert train == sources["a"][:18] + sources["b"][0::2]
    assert not set(test) & (set(train) | set(select))
    # each frame keeps its own mask: b's frame 21 is the test sequence's frame 10
    test_frames = list_frames(root, "c", with_masks=True)
    b_frames = list_frames(USIIGACI, "b", with_masks=True)
    assert np.array_equal(read_mask(test_frames[10].mask_path), read_mask(b_frames[21].mask_path))
    # both kinds of field are in training and test: crowded small cells (median area under 2,000 px) and large ones
    for sequence in ("a", "c"):
        small = [np.median(np.bincount(m.ravel())[1:][np.bincount(m.ravel())[1:] > 0]) < 2000
                 for m in (read_mask(f.mask_path) for f in list_frames(root, sequence, with_masks=True))]
        assert 0 < sum(small) < len(small)


@needs_usiigaci
def test_the_first_usiigaci_split_is_kept_by_its_name(tmp_path):
    root = prepare(SHARED_REAL, "usiigaci_by_sequence", str(tmp_path))
    assert [len(digests(root, s)) for s in "abc"] == [18, 4, 23]
    assert digests(root, "c") == digests(USIIGACI, "b")


@pytest.mark.skipif(not os.path.isfile(TRPL + "_img.tif"), reason=f"real sample not present at {TRPL}_img.tif")
def test_trpl_split_takes_consecutive_frames_of_the_movie(tmp_path):
    import tifffile

    root = prepare(SHARED_REAL, "trpL", str(tmp_path))
    images, masks = tifffile.imread(TRPL + "_img.tif"), tifffile.imread(TRPL + "_mask.tif")
    for sequence, frames in (("a", range(0, 12)), ("b", range(12, 15)), ("c", range(15, 20))):
        written = list_frames(root, sequence, with_masks=True)
        assert len(written) == len(frames)
        for frame, index in zip(written, frames):
            assert np.array_equal(read_tiff_2d(frame.image_path), images[index])
            assert np.array_equal(read_mask(frame.mask_path), masks[index])
