"""Pieces shared by two or more model families."""
from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out) conv weights, zero conv biases, BN scale 1 and shift 0; Linear layers are left alone."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def with_input_channels(model: nn.Module, in_chans: int) -> nn.Module:
    """`model` with its first convolution rebuilt for `in_chans` input channels (e.g. 1 for grayscale).

    The new convolution keeps every other setting and the module's place, so state_dict keys are unchanged; only
    its weight's input dimension differs. Its weights are drawn afresh (kaiming, as the zoo's stems): averaging
    RGB filters would tie a grayscale student to an initialisation no paper uses.
    """
    if in_chans == 3:
        return model
    found = next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[1].in_channels != 3 or found[1].groups != 1:
        raise ValueError(f"{type(model).__name__} does not start with a plain 3-channel convolution, so its input "
                         f"channels cannot be set to {in_chans}")
    name, old = found
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new.to(old.weight.device, old.weight.dtype))
    return model
