"""Data set adapters, splits, image decoding and the model's pixel transform."""

from agiqa.data.datasets import Dataset, Sample, load_dataset
from agiqa.data.images import decode_image, list_images, load_image
from agiqa.data.pixels import INPUT_SIZE, normalize, read_pixels, resize_pixels
from agiqa.data.splits import Split, make_split

__all__ = [
    "INPUT_SIZE",
    "Dataset",
    "Sample",
    "Split",
    "decode_image",
    "list_images",
    "load_dataset",
    "load_image",
    "make_split",
    "normalize",
    "read_pixels",
    "resize_pixels",
]
