"""The image datasets of ``fastvq train``, kept importable here: they live in ``fastvq.train.data``."""

from .train.data import (  # noqa: F401
    DATASET_KINDS,
    DatasetError,
    ImageData,
    __all__,  # noqa: F401
    load_cifar10,
    load_dataset,
    load_digits,
    load_image_folder,
    load_mnist,
    parse_dataset_spec,
)
