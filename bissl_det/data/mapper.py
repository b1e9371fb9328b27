"""detectron2's DatasetMapper with the project's image reader (see :mod:`.images`)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .images import read_image_array

__all__ = ["DetectionMapper"]


class DetectionMapper(DatasetMapper):
    """DatasetMapper whose images come from :func:`~bissl_det.data.images.read_image_array`.

    The same output as detectron2's mapper for 8-bit images; 16-bit images are scaled instead of
    clipped to white, and every unreadable file (corrupt, truncated, too large) is named. Labelled
    images are never skipped: that would silently change the training set. Pre-computed
    proposals and semantic segmentation are not used by this project and are refused.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.proposal_topk is not None:
            raise ValueError("MODEL.LOAD_PROPOSALS: pre-computed proposals are not supported")

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below; the catalog's stays intact
        if "sem_seg_file_name" in dataset_dict:
            raise ValueError(f"{dataset_dict['file_name']}: semantic segmentation is not supported")
        image = read_image_array(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        # A tensor, not a numpy array: DataLoader workers pass tensors through shared memory.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
        elif "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
