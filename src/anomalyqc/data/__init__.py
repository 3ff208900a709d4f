"""Reading image datasets from disk: layouts -> Records -> ImageDataset -> Batches."""

from anomalyqc.data.dataset import ImageDataset, make_loader
from anomalyqc.data.io import IMAGE_EXTENSIONS, list_images, read_image, read_mask
from anomalyqc.data.layouts import (
    Record,
    detect_layout,
    folder_records,
    mvtec_records,
    records_for,
)
from anomalyqc.data.transforms import (
    ImageTransform,
    center_crop,
    convert_channels,
    resize_image,
    resize_mask,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "ImageTransform",
    "Record",
    "center_crop",
    "convert_channels",
    "detect_layout",
    "folder_records",
    "list_images",
    "make_loader",
    "mvtec_records",
    "read_image",
    "read_mask",
    "records_for",
    "resize_image",
    "resize_mask",
]
