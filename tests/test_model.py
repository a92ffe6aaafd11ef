"""The U-Net of SPEC §4."""
import pytest
import torch

from unet import UNet


def test_parameter_count_of_the_baseline():
    assert sum(p.numel() for p in UNet().parameters()) == 1_927_907


def test_output_shape_and_optimiser():
    model = UNet(num_epochs=7)
    assert model(torch.zeros(2, 1, 64, 96)).shape == (2, 3, 64, 96)
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.Adam) and config["optimizer"].defaults["lr"] == 1e-3
    assert config["lr_scheduler"]["scheduler"].T_max == 7


def test_the_doctests_of_unet_hold():
    import doctest
    import unet
    assert doctest.testmod(unet).failed == 0


def test_soft_dice_ignores_ignored_pixels_and_background():
    import torch.nn.functional as F
    from augment import IGNORE
    from unet import soft_dice_loss
    target = torch.tensor([[[0, 1, 1, 2], [0, 0, 2, IGNORE]]])
    right = F.one_hot(target.clamp_max(2), 3).permute(0, 3, 1, 2).float() * 50
    wrong_where_ignored = right.clone()
    wrong_where_ignored[0, :, 1, 3] = torch.tensor([0.0, 50.0, 0.0])  # only the IGNORE pixel differs
    assert float(soft_dice_loss(right, target)) == pytest.approx(0, abs=1e-6)
    assert float(soft_dice_loss(wrong_where_ignored, target)) == pytest.approx(0, abs=1e-6)
    # every border pixel (class 1) called core (class 2): border Dice 0, core Dice 2*2/(2+4) = 2/3 -> 1 - (0 + 2/3)/2
    swapped = right.clone()
    swapped[0, :, 0, 1:3] = torch.tensor([0.0, 0.0, 50.0])[:, None]
    assert float(soft_dice_loss(swapped, target)) == pytest.approx(2 / 3, abs=1e-4)
    # background is not among the classes scored: background called border costs border's Dice only
    extra = right.clone()
    extra[0, :, 0, 0] = torch.tensor([0.0, 50.0, 0.0])
    assert float(soft_dice_loss(extra, target)) == pytest.approx(1 - (2 * 2 / 5 + 1) / 2, abs=1e-4)


def test_the_dice_term_is_added_to_the_training_loss_with_its_weight():
    from unet import soft_dice_loss
    torch.manual_seed(0)
    plain, weighted = UNet(widths=(4, 8), view="tiled", cell_width=16), UNet(widths=(4, 8), view="tiled",
                                                                             cell_width=16, dice_weight=2.0)
    weighted.load_state_dict(plain.state_dict())
    batch = {"image": torch.rand(2, 1, 16, 16) * 255, "target": torch.randint(0, 3, (2, 16, 16)),
             "weight": torch.ones(2, 16, 16)}
    for model in (plain, weighted):
        model.log = lambda *args, **kwargs: None
    expected = plain.training_step(batch, 0) + 2.0 * soft_dice_loss(plain(batch["image"]), batch["target"])
    assert float(weighted.training_step(batch, 0)) == pytest.approx(float(expected), rel=1e-5)
