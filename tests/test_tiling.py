"""The tile layout chosen for the device (tiling.py): on a CPU the cheapest by the cost table, covering every pixel
with at least the minimum overlap, the whole frame where that is cheapest (then exactly model(x)); on a GPU, or asked
for, the model's tile_size; frames batched still get what each gets alone."""
import numpy as np
import pytest
import torch

import tiling
from tiling import (CPU_COST_PER_MEGAPIXEL, CPU_MAX_TILE, Layout, cheapest_cpu_layout, choose_layout,
                    cpu_cost_per_pixel, fixed_layout, frame_layout, min_overlap, sliding_window_logits, tile_starts)
from unet import UNet

SIZES = [(8, 8), (72, 304), (160, 160), (200, 800), (304, 520), (512, 512), (624, 624), (720, 1024), (1024, 1024),
         (1536, 2048)]


def predicted_cost(layout: Layout, arithmetic: str) -> float:
    return layout.input_pixels() * float(cpu_cost_per_pixel(layout.tile_h * layout.tile_w, arithmetic))


def covered(layout: Layout, height: int, width: int) -> np.ndarray:
    counts = np.zeros((height, width), int)
    for y, x in layout.corners:
        counts[y:y + layout.tile_h, x:x + layout.tile_w] += 1
    return counts


def overlaps(starts, tile: int) -> list[int]:
    return [previous + tile - start for previous, start in zip(starts, starts[1:])]


@pytest.mark.parametrize("arithmetic", list(CPU_COST_PER_MEGAPIXEL))
@pytest.mark.parametrize("multiple", [4, 8, 16])
def test_cpu_layouts_cover_every_pixel_with_the_minimum_overlap(arithmetic, multiple):
    for height, width in SIZES:
        height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
        layout = cheapest_cpu_layout(height, width, multiple, arithmetic)
        assert layout.tile_h % multiple == 0 and layout.tile_w % multiple == 0  # the poolings fit every tile
        assert covered(layout, height, width).min() >= 1
        for starts, tile, length in ((layout.ys, layout.tile_h, height), (layout.xs, layout.tile_w, width)):
            assert starts[0] == 0 and starts[-1] + tile == length and list(starts) == sorted(set(starts))
            assert all(overlap >= min_overlap(multiple) for overlap in overlaps(starts, tile))
            assert tile <= CPU_MAX_TILE
        # never dearer than the whole frame (where one tile may hold it) or the model's recorded 256 px tiles
        whole = Layout(height, width, (0,), (0,))
        if max(height, width) <= CPU_MAX_TILE:
            assert predicted_cost(layout, arithmetic) <= predicted_cost(whole, arithmetic)
        assert predicted_cost(layout, arithmetic) <= predicted_cost(fixed_layout(height, width, 256), arithmetic)


def test_known_cpu_layouts():
    assert min_overlap(8) == 32 and min_overlap(16) == 64
    # bf16 channels_last (inference on this CPU), 512 x 512: the whole frame, 1x its pixels, where the recorded 256 px
    # tiles take 9 tiles (2.25x); a pixel costs about as much in a large tile as in a small one, so overlap is waste
    assert cheapest_cpu_layout(512, 512, 8, "bf16 channels_last") == Layout(512, 512, (0,), (0,))
    assert fixed_layout(512, 512, 256) == Layout(256, 256, (0, 128, 256), (0, 128, 256))
    # bf16 NCHW (training's validation): past 192 px a pixel costs more, so 3 x 3 tiles of 192 overlapping by exactly
    # 32 px (3 x 192 - 2 x 32 = 512), 1.27x the frame's pixels
    assert cheapest_cpu_layout(512, 512, 8, "bf16 nchw") == Layout(192, 192, (0, 160, 320), (0, 160, 320))
    # float32's cost rises past 256 px: two tiles
    assert cheapest_cpu_layout(512, 512, 8, "fp32 channels_last") == Layout(512, 272, (0,), (0, 240))
    # larger than the largest tile: as few tiles as the cost allows
    assert cheapest_cpu_layout(1024, 1024, 8, "bf16 channels_last") == Layout(528, 528, (0, 496), (0, 496))
    # small frames whole
    for arithmetic in CPU_COST_PER_MEGAPIXEL:
        assert cheapest_cpu_layout(160, 160, 8, arithmetic) == Layout(160, 160, (0,), (0,))
        assert cheapest_cpu_layout(72, 304, 8, arithmetic) == Layout(72, 304, (0,), (0,))
    # a long thin frame: tiles along its length only
    assert cheapest_cpu_layout(200, 800, 8, "fp32 nchw") == Layout(200, 416, (0,), (0, 384))


def test_gpu_and_fixed_layouts_are_the_recorded_tile_size():
    for height, width in ((512, 512), (624, 624), (72, 304), (1024, 1024)):
        layout = fixed_layout(height, width, 256)
        assert layout == Layout(min(256, height), min(256, width), tuple(tile_starts(height, min(256, height), 0.25)),
                                tuple(tile_starts(width, min(256, width), 0.25)))
        assert choose_layout(height, width, "cuda", 256) == layout
        assert choose_layout(height, width, "cpu", 256, tiling="fixed") == layout
    assert choose_layout(512, 512, "cpu", 256) == cheapest_cpu_layout(512, 512, 8, "bf16 channels_last")
    assert choose_layout(512, 512, "cpu", 256, arithmetic="fp32 nchw") == cheapest_cpu_layout(512, 512, 8, "fp32 nchw")
    with pytest.raises(ValueError, match="tiling 'large'"):
        choose_layout(512, 512, "cpu", 256, tiling="large")


class ShapeRecorder(torch.nn.Module):
    """A pixel-wise stand-in that records the shape of every forward pass's input; a weight that channels_last
    changes, as a convolution's."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.weight = torch.nn.Parameter(torch.zeros(2, 2, 3, 3))

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return torch.cat([x, -x, 2 * x], 1)


def test_the_layout_follows_the_arithmetic_in_effect():
    model = ShapeRecorder()
    frame = torch.rand(1, 512, 512)
    with torch.no_grad():
        plain = sliding_window_logits(model, frame)
    assert tiling.arithmetic_of(model, "cpu") == "fp32 nchw"
    assert model.shapes == [(1, 1, 512, 272)] * 2  # float32's layout, one tile per pass on a CPU
    model.shapes.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert tiling.arithmetic_of(model, "cpu") == "bf16 nchw"
        sliding_window_logits(model, frame)
        assert model.shapes == [(1, 1, 192, 192)] * 9
        model.shapes.clear()
        model.to(memory_format=torch.channels_last)
        assert tiling.arithmetic_of(model, "cpu") == "bf16 channels_last"
        assert frame_layout(model, 512, 512, "cpu") == Layout(512, 512, (0,), (0,))
        sliding_window_logits(model, frame)
        assert model.shapes == [(1, 1, 512, 512)]  # whole
    # the blending gives a pixel-wise model's logits back, whatever the tiles
    torch.testing.assert_close(plain, model(frame[None])[0], rtol=1e-5, atol=1e-6)
    model.shapes.clear()
    with torch.no_grad():
        sliding_window_logits(model, frame, tile_size=256, tiling="fixed", batch_size=4)
    assert model.shapes == [(4, 1, 256, 256)] * 2 + [(1, 1, 256, 256)]  # the old path: 9 tiles, 4 a pass


def small_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(widths=(4, 8, 16), view="tiled", tile_size=64).eval()


def test_a_frame_the_cpu_layout_predicts_whole_equals_the_model():
    model = small_unet()
    frame = torch.randn(1, 152, 200)  # a multiple of 8: no padding
    assert len(frame_layout(model, 152, 200, "cpu").corners) == 1
    with torch.no_grad():
        assert torch.equal(sliding_window_logits(model, frame), model(frame[None])[0])
        odd = torch.randn(1, 150, 197)  # padded to 152 x 200, predicted once, cropped back
        padded = torch.nn.functional.pad(odd[None], (0, 3, 0, 2), mode="reflect")
        assert torch.equal(sliding_window_logits(model, odd), model(padded)[0, :, :150, :197])


def test_frames_batched_get_what_each_gets_alone_in_the_cpu_layout():
    model = small_unet()
    frames = torch.rand(3, 1, 512, 512)
    frames[1] *= 0.1
    layout = frame_layout(model, 512, 512, "cpu")
    assert len(layout.corners) > 1  # tiled: the blending and the tiles' order matter
    with torch.no_grad():
        batched = sliding_window_logits(model, frames)
        alone = torch.stack([sliding_window_logits(model, frame) for frame in frames])
        in_passes_of_3 = sliding_window_logits(model, frames, batch_size=3)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_passes_of_3, alone, rtol=1e-5, atol=1e-5)
    # and the tiled logits are close to the whole frame's: the overlap keeps the tiles' edges out of the result
    with torch.no_grad():
        whole = model(frames[:1])[0]
    assert (batched[0].argmax(0) == whole.argmax(0)).float().mean() > 0.99
