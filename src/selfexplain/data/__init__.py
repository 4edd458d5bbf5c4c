"""Image-classification data: offline built-in domains, any 🤗 `datasets` dataset, and ViT preprocessing.

- :mod:`.builtin_domains`: ``load_builtin_domain("mnist")`` and the registry :data:`BUILTIN_DOMAINS`: real
  images that ship inside PyPI wheels and generated domains with object masks (:mod:`.rendering` draws them).
- :mod:`.loading`: ``load_image_dataset`` takes a Hub id, a local folder, ``"builtin:<name>"`` or an in-memory
  dataset and returns it with ``image`` and ``label`` (``ClassLabel``) columns.
- :mod:`.preprocessing`: the offline image processor, the deterministic train/eval transform and batching.
- :mod:`.columns`: the column, split and prefix names every module shares.
"""

from .builtin_domains import (
    BUILTIN_DOMAINS,
    UNION_LABEL_OFFSETS,
    UNION_MEMBERS,
    BuiltinDomain,
    load_builtin_domain,
)
from .columns import BUILTIN_PREFIX, EXPLANATION_TARGETS_COLUMN, IMAGE_SIZE, MASK_COLUMN, SPLITS
from .loading import (
    detect_columns,
    detect_image_column,
    id2label,
    label2id,
    label_names,
    load_image_dataset,
)
from .preprocessing import ImageClassificationTransform, build_transform, collate_fn, default_image_processor

__all__ = [
    "BUILTIN_DOMAINS",
    "BUILTIN_PREFIX",
    "EXPLANATION_TARGETS_COLUMN",
    "IMAGE_SIZE",
    "MASK_COLUMN",
    "SPLITS",
    "UNION_LABEL_OFFSETS",
    "UNION_MEMBERS",
    "BuiltinDomain",
    "ImageClassificationTransform",
    "build_transform",
    "collate_fn",
    "default_image_processor",
    "detect_columns",
    "detect_image_column",
    "id2label",
    "label2id",
    "label_names",
    "load_builtin_domain",
    "load_image_dataset",
]
