"""The U-Net of SPEC §4."""
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
