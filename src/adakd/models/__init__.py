"""Model zoo (who): CIFAR and ImageNet classifiers under the CRD benchmark's names, timm / torchvision models by
name (`create("timm:convnext_atto")`), plus the staged view."""
from adakd.models.registry import available, create, register_model
from adakd.models.stage_types import Stage, StagedOutput
from adakd.models.staged import FrozenStagedModel, StagedModel, frozen, register_layout, staged
from adakd.models import cifar, imagenet  # noqa: F401  (importing registers every family)
from adakd.models.checkpoint import load_state_dict_file, load_weights
from adakd.models.auto_staged import AutoLayoutError, auto_stages
from adakd.models.external import ModelSourceError

__all__ = [
    "available",
    "create",
    "register_model",
    "Stage",
    "StagedModel",
    "StagedOutput",
    "register_layout",
    "staged",
    "frozen",
    "FrozenStagedModel",
    "load_state_dict_file",
    "load_weights",
    "auto_stages",
    "AutoLayoutError",
    "ModelSourceError",
]
