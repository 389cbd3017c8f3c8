"""Keys that change which images a trial trains on, is cut on or ranks on are refused under
``search:`` (on their own and in a variant) with one line naming the key: trials are
compared image by image, on one hold-out."""

from __future__ import annotations

import pytest

from cadis.errors import CadisError
from cadis.sweeps.parse import sweep_from_mapping
from tests.test_sweep_config import with_changes

# A valid searched value of each key: refused for what it changes, not for the value.
IMAGE_KEYS = {
    "val_images": {"choice": [100, 200]},
    "val_seed": {"choice": [0, 1]},
    "max_train_images": {"choice": [1000, 2000]},
    "proxy_images": {"choice": [50, 100]},
    "dataset": {"choice": ["digits", "fashion-mnist"]},
    "data_root": {"choice": ["a", "b"]},
    "image_size": {"choice": [32, 64]},
}


def refusal(search: dict) -> str:
    with pytest.raises(CadisError) as caught:
        sweep_from_mapping(with_changes(search=search))
    return str(caught.value)


@pytest.mark.parametrize("key", sorted(IMAGE_KEYS))
def test_a_key_that_changes_the_images_is_refused_under_search_by_name(key):
    message = refusal({key: IMAGE_KEYS[key], "lambda": {"uniform": [0.5, 8]}})
    assert message.startswith(f"search.{key}: not searchable: ") and "\n" not in message
    assert "same" in message and "set it in base" in message


@pytest.mark.parametrize("key", sorted(IMAGE_KEYS))
def test_a_key_that_changes_the_images_is_refused_in_a_variant_too(key):
    message = refusal({"variant": {"grid": [{"lambda": 1.0},
                                            {key: IMAGE_KEYS[key]["choice"][0]}]}})
    assert message.startswith(f"search.variant[1].{key}: not searchable: ")
    assert "\n" not in message
