"""The data layer: reading texts and labelled tables (files, hub) and the recipe's `data:` and
`calibration:` blocks that name them. Nothing here knows of models."""

from hm3.data.blocks import (
                             CalibrationSpec,
                             load_data_block,
                             parse_calibration_block,
                             parse_data_block,
)
from hm3.data.calibration import Calibration, load_calibration, source_texts
from hm3.data.tables import (
    FILE_TYPES,
    Dataset,
    hub_texts,
    load_dataset,
    looks_like_path,
    read_table,
    read_texts,
    read_utf8,
)

__all__ = ["FILE_TYPES", "Calibration", "CalibrationSpec", "Dataset", "hub_texts",
           "load_calibration", "load_data_block", "load_dataset", "parse_calibration_block",
           "looks_like_path", "parse_data_block", "read_table", "read_texts", "read_utf8",
           "source_texts"]
