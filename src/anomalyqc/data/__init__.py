"""Reading image datasets from disk: layouts -> Records -> ImageDataset -> Batches."""

from anomalyqc.data.dataset import ImageDataset, make_loader
from anomalyqc.data.io import IMAGE_EXTENSIONS, list_images, read_image, read_mask
from anomalyqc.data.layouts import (
    Listing,
    Record,
    dataset_listing,
    detect_layout,
    folder_listing,
    folder_records,
    mvtec_listing,
    mvtec_records,
    records_for,
)
from anomalyqc.data.listing import Skipped
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
    "Listing",
    "Record",
    "Skipped",
    "center_crop",
    "convert_channels",
    "dataset_listing",
    "detect_layout",
    "folder_listing",
    "folder_records",
    "list_images",
    "make_loader",
    "mvtec_listing",
    "mvtec_records",
    "read_image",
    "read_mask",
    "records_for",
    "resize_image",
    "resize_mask",
]
