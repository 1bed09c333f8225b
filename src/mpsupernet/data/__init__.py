"""Segmentation data for SAM: synthetic datasets (instances and classes), the semantic schema (ADE20K's), real
evaluation images, adapters from Hub schemas, prompt sampling and preprocessing."""

from .adapters import (
    DATASET_SCHEMAS,
    STANDARD_FEATURES,
    dataset_name,
    decode_coco_segmentation,
    from_coco_annotations,
    from_instance_mask_columns,
    from_semantic_maps,
    semantic_map_to_masks,
    to_standard_schema,
)
from .processing import (
    MODEL_INPUT_NAMES,
    PROMPT_MODES,
    SamSegmentationPreprocessor,
    collate_fn,
    low_res_mask_size,
    remove_examples_without_masks,
)
from .prompts import PAD_POINT_LABEL, jitter_box, mask_to_box, sample_points
from .semantic import (
    ADE20K_NUM_LABELS,
    SEMANTIC_FEATURES,
    SYNTHETIC_SEMANTIC_DATASET_NAME,
    SYNTHETIC_SEMANTIC_ID2LABEL,
    SemanticSegmentationPreprocessor,
    check_dataset_task,
    from_ade20k,
    is_semantic_dataset,
    make_synthetic_semantic_dataset,
    make_synthetic_semantic_dataset_dict,
    reduce_ade20k_labels,
)
from .real import REAL3_DOMAINS, REAL3_FEATURES, REAL3_INSTALL, is_real3_available, load_real3_dataset
from .synthetic import (
    SYNTHETIC_DATASET_NAME,
    SYNTHETIC_FEATURES,
    make_synthetic_segmentation_dataset,
    make_synthetic_segmentation_dataset_dict,
)


__all__ = [
    "ADE20K_NUM_LABELS",
    "SEMANTIC_FEATURES",
    "SYNTHETIC_SEMANTIC_DATASET_NAME",
    "SYNTHETIC_SEMANTIC_ID2LABEL",
    "SemanticSegmentationPreprocessor",
    "check_dataset_task",
    "from_ade20k",
    "is_semantic_dataset",
    "make_synthetic_semantic_dataset",
    "make_synthetic_semantic_dataset_dict",
    "reduce_ade20k_labels",
    "DATASET_SCHEMAS",
    "MODEL_INPUT_NAMES",
    "PAD_POINT_LABEL",
    "PROMPT_MODES",
    "REAL3_DOMAINS",
    "REAL3_FEATURES",
    "REAL3_INSTALL",
    "STANDARD_FEATURES",
    "SYNTHETIC_DATASET_NAME",
    "SYNTHETIC_FEATURES",
    "SamSegmentationPreprocessor",
    "collate_fn",
    "dataset_name",
    "decode_coco_segmentation",
    "from_coco_annotations",
    "from_instance_mask_columns",
    "from_semantic_maps",
    "is_real3_available",
    "jitter_box",
    "load_real3_dataset",
    "low_res_mask_size",
    "make_synthetic_segmentation_dataset",
    "make_synthetic_segmentation_dataset_dict",
    "mask_to_box",
    "remove_examples_without_masks",
    "sample_points",
    "semantic_map_to_masks",
    "to_standard_schema",
]
