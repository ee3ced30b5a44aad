"""ImageNet families (224x224 input)."""
from adakd.models.imagenet import mobilenetv1, resnet  # noqa: F401
