"""The post-training size filter: typical_cell_area and drop_small_instances on hand-built label images, the choice of
min_area_fraction on validation frames (with a model that predicts known border-core maps), and that the choice
travels in the checkpoint to inference."""
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from border_core import (border_core_targets, drop_small_instances, instances_from_border_core, resize_nearest,
                         typical_cell_area)
from inference import Postprocess
from unet import MIN_AREA_FRACTIONS, UNet, best_size_filter, load_model, score_frame, validation_score


def cells_and_fragments(fragments=True):
    """Four 20 x 20 cells (400 px) and, optionally, ten 5 x 5 fragments (25 px) between them."""
    labels = np.zeros((128, 128), np.int32)
    for k, (y, x) in enumerate([(10, 10), (10, 70), (70, 10), (70, 70)], start=1):
        labels[y:y + 20, x:x + 20] = k
    if fragments:
        for k in range(10):
            y, x = 40 + 6 * (k % 2), 6 + 12 * k
            labels[y:y + 5, x:x + 5] = 5 + k
    return labels


def test_typical_cell_area_is_the_area_weighted_median():
    labels = cells_and_fragments()
    # sizes 25 (x10), 400 (x4): the plain median is 25; the pixel in the middle of all 1,850 lies in a 400 px cell
    assert typical_cell_area(labels) == 400
    assert typical_cell_area(cells_and_fragments(fragments=False)) == 400
    assert typical_cell_area(np.zeros((8, 8), np.int32)) == 0
    mixed = np.zeros((10, 10), np.int32)
    mixed[0, :2], mixed[1, :3], mixed[2:4, :] = 1, 2, 3  # 2, 3 and 20 px: the 20 px cell holds the median pixel
    assert typical_cell_area(mixed) == 20


def test_drop_small_instances_keeps_order_and_renumbers():
    labels = np.array([[0, 3, 3, 3],
                       [7, 0, 5, 5],
                       [7, 0, 5, 5]], np.uint32)
    # sizes: 3 -> 3 px, 5 -> 4 px, 7 -> 2 px; at most 2 px goes, the rest keep their order as 1, 2
    expected = np.array([[0, 1, 1, 1],
                         [0, 0, 2, 2],
                         [0, 0, 2, 2]], np.uint32)
    np.testing.assert_array_equal(drop_small_instances(labels, 2), expected)
    np.testing.assert_array_equal(drop_small_instances(labels, 0), labels)
    assert drop_small_instances(labels, 4).max() == 0


def test_min_area_fraction_drops_fragments_relative_to_the_frame():
    semantic = border_core_targets(cells_and_fragments())
    plain = instances_from_border_core(semantic)
    assert plain.max() == 14  # the fragments have no core, but are isolated border larger than 15 px
    filtered = instances_from_border_core(semantic, min_area_fraction=1 / 16)  # at most 25 px of 400: they go
    assert filtered.max() == 4
    np.testing.assert_array_equal(filtered > 0, np.isin(plain, np.unique(plain[cells_and_fragments() <= 4])[1:]))
    # the same fraction of a frame at twice the size (cells 4x the area) drops the same instances
    big = np.kron(semantic, np.ones((2, 2), semantic.dtype))
    assert instances_from_border_core(big, min_area_fraction=1 / 16).max() == 4


class KnownMaps(UNet):
    """A U-Net whose prediction is a fixed border-core map: its choice on validation frames has a known answer."""

    def __init__(self, semantic: np.ndarray, **kwargs):
        super().__init__(view="tiled", tile_size=128, cell_width=20.0, intensity="percentile", **kwargs)
        self.register_buffer("known", F.one_hot(torch.from_numpy(semantic).long(), 3).permute(2, 0, 1).float())

    def forward(self, x):
        return self.known[None].expand(len(x), -1, -1, -1) * 10


def validation_frame(gt):
    return {"image": torch.zeros(1, 128, 128), "target": torch.zeros(128, 128, dtype=torch.long),
            "instances": torch.from_numpy(resize_nearest(gt, (256, 256)).astype(np.int64)),
            "shape": torch.tensor([128, 128])}


@pytest.mark.parametrize("fragments", [True, False])
def test_min_area_fraction_is_chosen_on_validation_frames(fragments):
    labels = cells_and_fragments(fragments)
    gt = cells_and_fragments(fragments=False)  # the fragments are not cells
    model = KnownMaps(border_core_targets(labels), choose_size_filter=True)
    scores = dict(zip(MIN_AREA_FRACTIONS, score_frame(model, border_core_targets(labels),
                                                      validation_frame(gt)["instances"].numpy(), (128, 128),
                                                      MIN_AREA_FRACTIONS)))
    assert scores[0] == pytest.approx(4 / 14 if fragments else 1.0, abs=0.01)
    # the validation loop chooses it and keeps it in the hyperparameters that the epoch's checkpoints save
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.validate(model, DataLoader([validation_frame(gt)] * 2, batch_size=1), verbose=False)[0]
    if fragments:  # the smallest fraction that removes the 25 px fragments of 400 px cells: 1/16 (1/32 keeps them)
        assert best_size_filter(scores) == 1 / 16 and scores[1 / 16] == pytest.approx(1.0)
        assert scores[1 / 32] == scores[0]
        assert model.hparams.min_area_fraction == 1 / 16 and result["val_instance_dice"] == pytest.approx(1.0)
    else:  # nothing to gain: no filter
        assert best_size_filter(scores) == 0 and model.hparams.min_area_fraction == 0
    assert validation_score(model, [validation_frame(gt)]) == (pytest.approx(1.0), 1 / 16 if fragments else 0)


def test_recorded_fraction_reaches_inference(tmp_path):
    semantic = border_core_targets(cells_and_fragments())
    model = KnownMaps(semantic)
    path = str(tmp_path / "model.ckpt")
    hparams = {"view": "tiled", "tile_size": 128, "cell_width": 20.0}
    torch.save({"hyper_parameters": hparams, "state_dict": UNet().state_dict(), "global_step": 0, "loops": {}}, path)
    assert load_model(path).hparams.min_area_fraction == 0  # a checkpoint from before the filter
    hparams["min_area_fraction"] = 0.125
    torch.save({"hyper_parameters": hparams, "state_dict": UNet().state_dict(), "global_step": 0, "loops": {}}, path)
    loaded = load_model(path)
    assert loaded.hparams.min_area_fraction == 0.125
    shapes = [(128, 128)]
    assert Postprocess(loaded, shapes, native=True)(0, semantic).max() == 4
    assert Postprocess(model, shapes, native=True)(0, semantic).max() == 14


def test_checkpoints_of_old_runs_load_with_their_view(tmp_path):
    path = str(tmp_path / "old.ckpt")
    for patch_size, view in ((64, "tiled"), (0, "resized")):
        torch.save({"hyper_parameters": {"patch_size": patch_size, "tile_size": 128}, "state_dict": UNet().state_dict()},
                   path)
        loaded = load_model(path)
        assert loaded.hparams.view == view and "patch_size" not in loaded.hparams
