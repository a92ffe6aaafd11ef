"""Batched inference (several frames per batch, the tiles of all of them through the network together) gives what
frame-by-frame inference gives; the precision is chosen once; the scale is estimated from one pass."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import inference
from data_files import list_frames, write_sequence
from inference import (autocast_dtype, border_core_maps, estimate_cell_width, frames_loader, predict_images,
                       same_size_batches, sequence_scale)
from scale import median_cell_width
from tiling import sliding_window_logits
from unet import UNet
from views import Resized

CPU = torch.device("cpu")


def rod_frame(seed: int, shape=(150, 170), width: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Bright rods `width` px wide on a dark background at random places (a different frame per seed): image, mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.int32)
    label = 0
    for _ in range(40):
        vertical = rng.random() < 0.5
        length = int(rng.integers(3 * width, 5 * width))
        h, w = (length, width) if vertical else (width, length)
        y, x = int(rng.integers(2, shape[0] - h - 2)), int(rng.integers(2, shape[1] - w - 2))
        if (mask[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] == 0).all():
            label += 1
            mask[y:y + h, x:x + w] = label
    image = np.where(mask > 0, 200, 40).astype(np.uint8)
    return image, mask


class ThresholdModel(UNet):
    """Segments bright cells on a dark background at any scale: foreground by threshold, its pixels within 2 px of
    the background as border. The erosion reaches across tile edges, so tiles and their blending matter. Counts the
    images (frames or tiles) it is given and the forward passes."""

    def __init__(self, tile_size: int = 64, cell_width: float = 10.0):
        super().__init__(view="tiled", tile_size=tile_size, cell_width=cell_width, intensity="percentile")
        self.images_seen, self.passes = 0, 0

    def forward(self, x):
        self.images_seen += len(x)
        self.passes += 1
        foreground = (x > (x.amax((2, 3), keepdim=True) + x.amin((2, 3), keepdim=True)) / 2).float()
        core = -F.max_pool2d(-foreground, 5, stride=1, padding=2)
        return torch.cat([1 - foreground, core, foreground - core], 1) * 10 + 0.01 * x


def small_unet(tile_size: int = 64) -> UNet:
    torch.manual_seed(0)
    return UNet(widths=(4, 8, 16), view="tiled", tile_size=tile_size).eval()


@pytest.mark.parametrize("shape, tile_batch", [((75, 90), 3), ((130, 64), 4), ((40, 52), 2)])
def test_a_batch_of_frames_gets_the_logits_of_each_frame_alone(shape, tile_batch):
    # the model's 64 px tiles (the fixed layout: a CPU's own layout predicts frames this small whole): sizes that are
    # no multiple of the tile (or of 8) padded, tiled, cropped back; (40, 52) fits one tile; a tile batch that does
    # not divide the tiles of a frame mixes frames in one forward pass
    model = small_unet()
    frames = torch.rand(5, 1, *shape)
    frames[1] *= 0.1  # frames of different content
    frames[3] = torch.flip(frames[3], (-1,))
    with torch.no_grad():
        batched = sliding_window_logits(model, frames, 64, batch_size=tile_batch, tiling="fixed")
        alone = torch.stack([sliding_window_logits(model, frame, 64, batch_size=4, tiling="fixed")
                             for frame in frames])
    assert batched.shape == (5, 3, *shape)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.argmax(1), alone.argmax(1))


def test_frames_tiles_are_blended_as_before():
    # the blending is nnU-Net's: with a pixel-wise model every tile predicts the same, so any tiling and batching
    # gives the whole frame's logits back
    class Pixelwise(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x, 2 * x], 1)

    frames = torch.rand(3, 1, 100, 140)
    logits = sliding_window_logits(Pixelwise(), frames, 64, batch_size=5, tiling="fixed")
    torch.testing.assert_close(logits, Pixelwise()(frames), rtol=1e-5, atol=1e-6)


def test_batched_border_core_maps_and_instances_equal_frame_by_frame():
    model = ThresholdModel(tile_size=64)
    pairs = [rod_frame(seed) for seed in range(5)]
    images = [image for image, _ in pairs]
    # frame by frame, the model's 64 px tiles 4 per pass: how inference ran before
    old = [m for _, batch in border_core_maps(model, frames_loader(model, images, 1.0, 1, 0, CPU), CPU,
                                              tile_batch=4, tiling="fixed") for m in batch]
    passes_alone = model.passes
    # 2 frames per batch (the last batch holds 1), 7 tiles per pass, across frames
    loader = frames_loader(model, images, 1.0, 2, 0, CPU)
    assert [len(indices) for _, indices in loader] == [2, 2, 1]
    new = [m for _, batch in border_core_maps(model, loader, CPU, tile_batch=7, tiling="fixed") for m in batch]
    assert model.passes - passes_alone < passes_alone  # fewer, fuller forward passes
    assert len(old) == len(new) == 5 and all(np.array_equal(a, b) for a, b in zip(old, new))
    assert all(len(np.unique(m)) == 3 for m in new)  # background, core and border in every frame: a real test
    frame_by_frame = predict_images(model, images, cell_width=10.0, device="cpu", batch_size=1, tile_batch=4,
                                    tiling="fixed")
    batched = predict_images(model, images, cell_width=10.0, device="cpu", batch_size=3, tile_batch=16,
                             tiling="fixed")
    for (_, mask), a, b in zip(pairs, frame_by_frame, batched):
        np.testing.assert_array_equal(a, b)
        assert a.max() == mask.max()  # every rod found: the maps compared hold the cells


def test_frames_of_different_sizes_are_batched_apart_in_order():
    assert same_size_batches([(4, 4)] * 5 + [(8, 8)] * 2 + [(4, 4)], 2) == [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert same_size_batches([(10, 10)] * 4, 8, max_pixels=250) == [[0, 1], [2, 3]]
    assert same_size_batches([(100, 100)] * 2, 8, max_pixels=10) == [[0], [1]]  # one frame even above the bound
    model = ThresholdModel(tile_size=64)
    images = [rod_frame(0)[0], rod_frame(1, (120, 100))[0], rod_frame(2, (120, 100))[0], rod_frame(3)[0]]
    loader = frames_loader(model, images, 1.0, 4, 0, CPU)
    assert [indices.tolist() for _, indices in loader] == [[0], [1, 2], [3]]
    # rescaled frames: batched by the size the model sees
    loader = frames_loader(model, images, [1.0, 1.0, 0.5, 0.5], 4, 0, CPU)
    assert [tuple(images.shape[-2:]) for images, _ in loader] == [(150, 170), (120, 100), (60, 50), (75, 85)]
    labels = predict_images(model, images, cell_width=10.0, device="cpu", batch_size=4)
    assert [m.shape for m in labels] == [image.shape for image in images]


def test_precision_is_chosen_once_from_the_device(monkeypatch, tmp_path):
    import precision
    reads_cpuinfo = precision.cpu_has_bf16_units.__wrapped__
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert autocast_dtype(CPU) is None and autocast_dtype(CPU, "fp32") is None
    assert precision.trainer_precision(None, cuda=False) == "32-true"
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert autocast_dtype(CPU) is torch.bfloat16 and autocast_dtype(CPU, "fp32") is None
    assert precision.trainer_precision(None, cuda=False) == "bf16-mixed"
    assert precision.trainer_precision(None, cuda=True) == "16-mixed"
    assert precision.trainer_precision("32-true", cuda=False) == "32-true"
    # the flags as /proc/cpuinfo lists them
    for flags, expected in (("fpu avx2 avx512f amx_bf16 amx_tile", True), ("fpu avx2 avx512_bf16", True),
                            ("fpu avx2 avx512f avx512_vnni", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert reads_cpuinfo(str(tmp_path / "cpuinfo")) is expected
    assert reads_cpuinfo(str(tmp_path / "absent")) is False
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert autocast_dtype(cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert autocast_dtype(cuda) is torch.float16
    assert autocast_dtype(cuda, "fp32") is None and autocast_dtype(cuda, "bf16") is torch.bfloat16
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16 and autocast_dtype(CPU, "fp16") is torch.float16
    with pytest.raises(ValueError, match="precision 'int8'"):
        autocast_dtype(CPU, "int8")


def test_the_cpu_path_runs_in_float32_unchanged(monkeypatch):
    import precision
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    model = small_unet()
    frames = [np.random.default_rng(seed).integers(0, 255, (96, 120)).astype(np.uint8) for seed in range(2)]
    loader = frames_loader(model, frames, 1.0, 2, 0, CPU)
    maps = [m for _, batch in border_core_maps(model, loader, CPU) for m in batch]
    images = next(iter(loader))[0]
    with torch.no_grad():
        expected = sliding_window_logits(model, images, 64, batch_size=4).argmax(1).numpy()
    assert maps[0].dtype == np.uint8 and all(np.array_equal(a, b) for a, b in zip(maps, expected))
    seen = []
    real_autocast = torch.autocast
    try:
        torch.autocast = lambda device_type, dtype=None, enabled=True: seen.append((device_type, enabled)) or \
            real_autocast(device_type, dtype=dtype, enabled=enabled)
        list(border_core_maps(model, loader, CPU))
    finally:
        torch.autocast = real_autocast
    assert seen == [("cpu", False)]


def test_precision_flag_is_checked_and_its_default_shown(capsys):
    with pytest.raises(SystemExit):
        inference.main(["--root_dir", "x", "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inference.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision {auto,fp32,bf16,fp16}" in text and "(default: auto)" in text and "--tile_batch" in text
    assert "--tiling {auto,fixed}" in text


def test_scale_is_estimated_from_one_pass_over_the_probe_frames():
    pairs = [rod_frame(seed, width=20) for seed in range(5)]  # cells twice the model's width
    images = [image for image, _ in pairs]
    truth = median_cell_width(mask for _, mask in pairs[:1] + pairs[2:3] + pairs[4:])  # the probes: first, middle, last
    model = ThresholdModel(tile_size=512, cell_width=10.0)  # one tile holds a frame: images seen = frames predicted
    width = estimate_cell_width(model, images, CPU)
    assert width == pytest.approx(truth, abs=1.0) and truth == pytest.approx(20, abs=1)
    assert model.images_seen == 3 and model.passes == 3  # three probes, each predicted once (one per pass on a CPU)
    model.images_seen = 0
    assert sequence_scale(model, images, CPU, say=lambda line: None) == pytest.approx(10 / width)
    assert model.images_seen == 3
    model.images_seen = 0
    assert sequence_scale(model, images, CPU, cell_width=20.0, say=lambda line: None) == 0.5
    assert model.images_seen == 0  # the width given: nothing predicted to estimate it
    predict_images(model, images, cell_width=20.0, device="cpu")
    assert model.images_seen == 5  # only the frames themselves


def test_a_sequence_is_predicted_in_batches_from_files(tmp_path):
    import tifffile

    from inference import predict_sequence

    pairs = [rod_frame(seed, (100, 120)) for seed in range(5)]
    root = str(tmp_path / "data")
    write_sequence(root, "a", pairs)
    model = ThresholdModel(tile_size=64, cell_width=12.0)
    for batch_size, name in ((1, "one"), (4, "four")):
        assert predict_sequence(model, root, "a", str(tmp_path / name), batch_size, 0, CPU, native=True,
                                cell_width=12.0) == 5
    for frame in list_frames(root, "a", with_masks=False):
        one = tifffile.imread(tmp_path / "one" / "a" / f"mask{frame.name[1:]}.tif")
        four = tifffile.imread(tmp_path / "four" / "a" / f"mask{frame.name[1:]}.tif")
        np.testing.assert_array_equal(one, four)
        assert one.max() > 0


def test_class_map_is_argmax_with_its_ties():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 40, 50)
    logits[:, 2, :10] = logits[:, 0, :10]  # two classes tie: the first of them, as argmax
    logits[:, 1, 10:20] = logits[:, 0, 10:20]
    logits[:, 2, 10:20] = logits[:, 0, 10:20]  # all three tie
    logits[0, :, 30:] = logits[0, :, 30:].round()  # many ties of every kind
    expected = logits.argmax(1).to(torch.uint8)
    assert torch.equal(inference.class_map(logits), expected)
    assert torch.equal(inference.class_map(logits.contiguous(memory_format=torch.channels_last)), expected)
    assert inference.class_map(logits).dtype == torch.uint8 and len(expected.unique()) == 3


def test_resized_frames_go_one_pass_each_on_a_cpu():
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.passes = []

        def forward(self, x):
            self.passes.append(len(x))
            return torch.cat([x, -x, 2 * x], 1)

    model, view = Counting(), Resized(64)
    images = torch.rand(5, 1, 64, 64)
    with torch.no_grad():
        logits = view.logits(model, images)
        assert model.passes == [1] * 5  # tiling.TILES_PER_PASS["cpu"]: a batch costs more per pixel on a CPU
        torch.testing.assert_close(logits, torch.cat([images, -images, 2 * images], 1))
        model.passes.clear()
        assert torch.equal(view.logits(model, images, tile_batch=2), logits) and model.passes == [2, 2, 1]
