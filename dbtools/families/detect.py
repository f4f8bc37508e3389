"""Detection names, kept for the callers that read them from here: the rules live in
`families.registry` (which family a model is), `families.sd` and `families.sdxl` (what
each family is made of), `families.base` (`ModelFamily`, `Detected`, `UnsupportedFamily`).

Pure rules, no file access: callers (`dbtools.families.models`) read `model_index.json`, component
configs or a single file's key names and hand them in. A family is detected from what a
model is, never declared by a flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dbtools.families.base import EPSILON, V_PREDICTION, Detected, UnsupportedFamily
from dbtools.families.base import ModelFamily as Family
from dbtools.families.registry import (
    FAMILIES as _ORDERED,
)
from dbtools.families.registry import (
    OTHER_PIPELINES,
    OTHER_SINGLE_FILES,
    family_for_keys,
    family_for_model_index,
    trained_labels,
)
from dbtools.families.sd import SD1, SD2, is_openclip
from dbtools.families.sdxl import (
    SDXL,
    add_time_ids,
    cover_crop,
    encode_prompt_sdxl,
    time_ids_for_image,
    tokenize_sdxl,
)

__all__ = ["EPSILON", "FAMILIES", "OTHER_PIPELINES", "OTHER_SINGLE_FILES", "SD1", "SD2", "SDXL", "TRAINED",
           "V_PREDICTION", "Detected", "Family", "UnsupportedFamily", "add_time_ids", "cover_crop",
           "encode_prompt_sdxl", "family_from_keys", "family_from_model_index", "family_from_text_config",
           "prediction_type_from_keys", "prediction_type_from_scheduler", "time_ids_for_image", "tokenize_sdxl"]

FAMILIES = {f.key: f for f in _ORDERED}
TRAINED = trained_labels()
"""The families this toolkit trains, as messages name them."""

family_from_model_index = family_for_model_index
family_from_keys = family_for_keys


def family_from_text_config(text_config: Mapping) -> Family:
    """SD 1.x or SD 2.x from the (first) text encoder's config (`sd.is_openclip`)."""
    return SD2 if is_openclip(text_config) else SD1


def prediction_type_from_scheduler(scheduler_config: Mapping | None) -> str:
    """The scheduler config's `prediction_type` (diffusers' default, epsilon, when absent)."""
    return str((scheduler_config or {}).get("prediction_type") or EPSILON)


def prediction_type_from_keys(keys: Iterable[str], family: Family) -> str:
    """A single file's prediction type (`ModelFamily.prediction_type_from_keys`); a file's
    config folder, when given, overrides this."""
    return family.prediction_type_from_keys(frozenset(keys))
