"""The strong view of two-view training (data.views: 2): RandAugment (n = 2) and Cutout, batched on the device.

Follows Jin-Ying/Multi-Level-Logit-Distillation: mdistiller/dataset/cifar100.py, `RandAugment(2, 10)`, `augment_list`
and `Cutout` (FixMatch's op list: each image takes 2 of 14 ops, each with a magnitude drawn uniformly in the op's
range, then a Cutout square of side up to half the image filled with (125, 123, 114)); the strong view also has its
own random crop and flip, as the reference's strong transform does. Every random number is drawn on the CPU from
the loader's epoch generator (`draw_randaugment`), so an epoch's strong view replays from (seed, epoch); the ops run
on whole batches with per-sample parameters (each op computed for the batch, then kept where a sample chose it), so
nothing waits for the device.

Departures from PIL (same op, small pixel differences): geometric ops (rotate, shear, translate) sample the nearest
pixel at the output pixel's centre and fill with 0 as PIL's defaults do; the enhance ops work in float and round to
0..255 after each op (PIL rounds the same way through uint8); Sharpness's 3 x 3 smoothing keeps the border pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STRONG_AUGS = ("randaugment",)
# (name, low, high) in the reference's order (augment_list); the magnitude is low + (high - low) * u, u ~ U[0, 1).
OPS = (("autocontrast", 0.0, 1.0), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95),
       ("equalize", 0.0, 1.0), ("identity", 0.0, 1.0), ("posterize", 4.0, 8.0), ("rotate", -30.0, 30.0),
       ("sharpness", 0.05, 0.95), ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0.0, 256.0),
       ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3))
OPS_PER_IMAGE = 2
CUTOUT_MAX = 0.5  # of the image side
CUTOUT_FILL = (125.0, 123.0, 114.0)
_GRAY = (0.299, 0.587, 0.114)  # PIL's "L" conversion


def draw_randaugment(generator: torch.Generator, total: int) -> dict[str, torch.Tensor]:
    """The random numbers of `total` strong views: op choices, their magnitudes, Cutout size and corner (CPU)."""
    return {"ops": torch.randint(0, len(OPS), (total, OPS_PER_IMAGE), generator=generator),
            "magnitudes": torch.rand(total, OPS_PER_IMAGE, generator=generator, dtype=torch.float64),
            "cutout": torch.rand(total, 3, generator=generator, dtype=torch.float64)}


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    weights = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _autocontrast(x, v):
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    spread = high - low
    return torch.where(spread > 0, (x - low) * 255.0 / spread.clamp(min=1e-6), x)


def _equalize(x, v):
    n, c, h, w = x.shape
    q = x.round().long().clamp(0, 255).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, q, torch.ones_like(q))
    last = hist.gather(1, q.amax(1, keepdim=True))
    step = (h * w - last) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand_as(lut))
    return lut.gather(1, q).view(n, c, h, w).to(x.dtype)


def _sharpness(x, v):
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c).round()
    border = torch.ones_like(x, dtype=torch.bool)
    border[:, :, 1:-1, 1:-1] = False
    smooth = torch.where(border, x, smooth)
    return smooth + _per_sample(v) * (x - smooth)


COLOUR = {
    "autocontrast": _autocontrast,
    "brightness": lambda x, v: x * _per_sample(v),
    "color": lambda x, v: _gray(x) + _per_sample(v) * (x - _gray(x)),
    "contrast": lambda x, v: (lambda m: m + _per_sample(v) * (x - m))(_gray(x).mean(dim=(1, 2, 3), keepdim=True)),
    "equalize": _equalize,
    "posterize": lambda x, v: (lambda unit: torch.div(x, unit, rounding_mode="floor") * unit)(
        _per_sample(2.0 ** (8 - v.floor().clamp(min=1)))),
    "sharpness": _sharpness,
    "solarize": lambda x, v: torch.where(x >= _per_sample(v), 255.0 - x, x),
}


def _geometric(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate, shear and translate, each on the samples that chose it (others untouched): one nearest gather."""
    n, c, h, w = x.shape
    index = {name: k for k, (name, _, _) in enumerate(OPS)}
    zero = torch.zeros_like(v)
    # PIL's rotate(angle): counter-clockwise about the centre; the source of (x, y) is R(angle) applied about it.
    angle = torch.where(op == index["rotate"], v, zero) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2, h / 2
    a, b, d, e = cos, sin, -sin, cos
    tx, ty = cx - cos * cx - sin * cy, cy + sin * cx - cos * cy
    b = b + torch.where(op == index["shear_x"], v, zero)
    d = d + torch.where(op == index["shear_y"], v, zero)
    tx = tx + torch.where(op == index["translate_x"], v * w, zero)
    ty = ty + torch.where(op == index["translate_y"], v * h, zero)
    xs = torch.arange(w, device=x.device, dtype=v.dtype) + 0.5
    ys = torch.arange(h, device=x.device, dtype=v.dtype) + 0.5
    grid_x, grid_y = xs.view(1, 1, w), ys.view(1, h, 1)
    src_x = (a.view(-1, 1, 1) * grid_x + b.view(-1, 1, 1) * grid_y + tx.view(-1, 1, 1)).floor().long()
    src_y = (d.view(-1, 1, 1) * grid_x + e.view(-1, 1, 1) * grid_y + ty.view(-1, 1, 1)).floor().long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    flat = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w).expand(-1, c, -1)
    moved = x.flatten(2).gather(2, flat).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1), moved, torch.zeros_like(moved))


def _cutout(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    size = draws[:, 0] * CUTOUT_MAX * w
    x0 = (draws[:, 1] * w - size / 2).clamp(min=0).floor()
    y0 = (draws[:, 2] * h - size / 2).clamp(min=0).floor()
    x1, y1 = (x0 + size).clamp(max=w), (y0 + size).clamp(max=h)
    cols = torch.arange(w, device=x.device, dtype=draws.dtype).view(1, 1, w)
    rows = torch.arange(h, device=x.device, dtype=draws.dtype).view(1, h, 1)
    # PIL's rectangle fills both corners inclusively; a size of 0 leaves the image as it is.
    inside = ((cols >= x0.view(-1, 1, 1)) & (cols <= x1.view(-1, 1, 1)) & (rows >= y0.view(-1, 1, 1))
              & (rows <= y1.view(-1, 1, 1)) & (size > 0).view(-1, 1, 1))
    fill = (torch.tensor(CUTOUT_FILL, device=x.device, dtype=x.dtype) if c == 3
            else torch.full((c,), sum(CUTOUT_FILL) / 3, device=x.device, dtype=x.dtype)).view(1, c, 1, 1)
    return torch.where(inside.unsqueeze(1), fill, x)


def randaugment(images: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor,
                cutout: torch.Tensor) -> torch.Tensor:
    """RandAugment(2) then Cutout on a uint8 batch (N x C x H x W, 0..255) with its drawn parameters; uint8 out.

    `ops` and `magnitudes` stay on the CPU: the samples that chose each op are found there and only they are
    computed (index lists copied to the device, never read back), about two ops' work per image.
    """
    x = images.to(torch.float32)
    device = x.device
    low = torch.tensor([o[1] for o in OPS], dtype=torch.float64)
    high = torch.tensor([o[2] for o in OPS], dtype=torch.float64)
    geometric = torch.tensor([name not in COLOUR and name != "identity" for name, _, _ in OPS])
    for k in range(OPS_PER_IMAGE):
        op = ops[:, k].cpu()
        v = (low[op] + (high[op] - low[op]) * magnitudes[:, k].cpu()).to(torch.float32)
        for index, (name, _, _) in enumerate(OPS):
            if name in COLOUR:
                chosen = (op == index).nonzero().flatten()
                if len(chosen):
                    rows = chosen.to(device, non_blocking=True)
                    x[rows] = COLOUR[name](x[rows], v[chosen].to(device, non_blocking=True)).round().clamp(0, 255)
        moving = geometric[op].nonzero().flatten()
        if len(moving):
            rows = moving.to(device, non_blocking=True)
            x[rows] = _geometric(x[rows], op[moving].to(device, non_blocking=True),
                                 v[moving].to(device, non_blocking=True))
    return _cutout(x, cutout.to(device, torch.float32)).round().clamp(0, 255).to(torch.uint8)
