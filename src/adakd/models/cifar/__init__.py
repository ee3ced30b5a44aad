"""CIFAR-style families (32x32 input; adaptive pooling also serves 64x64)."""
from adakd.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
