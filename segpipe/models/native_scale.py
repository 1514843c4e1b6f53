"""A torchvision detection transform that keeps every image at its own scale.

torchvision's ``GeneralizedRCNNTransform`` resizes each image so that its short side is
``min_size``. segpipe trains on crops, evaluates whole images and predicts tiles, all at the
imagery's native ground resolution, so Mask R-CNN must see objects at the size they have. This
transform still normalises and pads to the size divisor but never resizes, and it survives
``torch.jit.script`` and ONNX tracing unchanged (nothing is set per call).

This module has no ``from __future__ import annotations``: TorchScript compiles ``resize`` from
its source and needs the annotations as real types.
"""


from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class NativeScaleTransform(GeneralizedRCNNTransform):
    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target
