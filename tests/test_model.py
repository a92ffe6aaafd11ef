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


def test_warmed_ema_follows_its_recursion_and_reaches_the_set_decay():
    import doctest
    import callbacks
    from torch.optim.swa_utils import AveragedModel
    assert doctest.testmod(callbacks).failed == 0
    parameter = torch.nn.Parameter(torch.tensor([0.0]))
    holder = torch.nn.Module()
    holder.p = parameter
    averaged = AveragedModel(holder, avg_fn=callbacks.warmed_ema(0.9), use_buffers=True)
    expected = None
    for step, value in enumerate([4.0, 2.0, 8.0] + [1.0] * 200):
        with torch.no_grad():
            parameter.fill_(value)
        averaged.update_parameters(holder)
        if expected is None:
            expected = value  # the first update copies
        else:
            weight = min(0.9, (1 + step) / (10 + step))
            expected = weight * expected + (1 - weight) * value
        assert float(averaged.module.p) == pytest.approx(expected, rel=1e-5)


def test_flip_averaged_prediction_is_mirror_equivariant_and_the_mean_of_four_passes():
    torch.manual_seed(0)
    model = UNet(widths=(4, 8)).eval()
    x = torch.rand(1, 1, 16, 24)
    with torch.no_grad():
        single = model(x)
        assert not torch.allclose(model(x.flip(-1)).flip(-1), single, atol=1e-4)  # one pass is not equivariant
        model.average_flips = True
        averaged = model(x)
        manual = sum(model.forward_once(x.flip(d)).flip(d) for d in ((), (-1,), (-2,), (-2, -1))) / 4
        assert torch.allclose(averaged, manual, atol=1e-6)
        for dims in ((-1,), (-2,), (-2, -1)):
            assert torch.allclose(model(x.flip(dims)).flip(dims), averaged, atol=1e-5)
        model.train()  # training is one pass whatever the flag (batch statistics: compare in training mode)
        assert torch.allclose(model(x), model.forward_once(x), atol=1e-6)
        assert not torch.allclose(model(x.flip(-1)).flip(-1), model(x), atol=1e-4)


def test_a_model_loads_predicting_with_the_flips_its_recipe_chose(tmp_path):
    from unet import load_model
    for chosen in (True, False):
        model = UNet(widths=(4, 8), view="tiled", cell_width=16.0, test_flips=chosen)
        path = tmp_path / f"flips_{chosen}.ckpt"
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
        loaded = load_model(str(path))
        assert loaded.average_flips is chosen
        assert load_model(str(path), test_flips="on").average_flips is True  # --test_flips overrides the recipe
        assert load_model(str(path), test_flips="off").average_flips is False
        x = torch.rand(1, 1, 16, 16)
        with torch.no_grad():
            assert torch.allclose(loaded.eval()(x.flip(-1)).flip(-1), loaded(x), atol=1e-5) is chosen
