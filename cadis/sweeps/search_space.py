"""A sweep's search space: parsed from ``search:`` and checked against the base.

As users write it (exactly one distribution per key)::

    lambda: {uniform: [0.5, 8]}             # a float in [low, high]
    epsilon: {loguniform: [0.05, 0.5]}      # a float, uniform in log space; low > 0
    num_noises: {int: [1, 4]}               # an integer in [low, high], BOTH bounds included
    lora_rank: {choice: [2, 4, 8]}          # one of the values, picked by the searcher
    confidence_threshold: {grid: [0.0, 0.5, argmax]}   # every value, each in its own trial
    variant: {grid: [{finetune: lora, lora_rank: 4}, {finetune: full}]}

``variant`` is reserved (no base key has that name): its grid values are mappings of base
keys applied together, for ablations whose arms are not a product of single keys (LoRA at
several ranks *and* full fine-tuning).

Every value a distribution can produce passes the base's own validation, so a bad range fails
at load with the base's message and not as a failed trial an hour later; a key that every
trial's method ignores (:data:`cadis.finetuning.config.IGNORED_BY_METHOD`) is refused.
:mod:`cadis.sweeps.searcher` turns the search space into Tune's domains.
"""

from __future__ import annotations

import typing
from typing import Any, Mapping, Sequence

from cadis.errors import CadisError
from cadis.finetuning.config import IGNORED_BY_METHOD, RENAMED, TrainConfig, from_mapping
from cadis.sweeps.distribution_text import RANGE_KINDS
from cadis.sweeps.spec import (
    DISTRIBUTIONS,
    INCUMBENT_PARAM,
    VARIANT_KEY,
    Distribution,
    SweepConfig,
)
from cadis.validation import number

# Base keys a sweep sets from its own sections: searching them would contradict those.
NOT_SEARCHABLE = {
    "certify": "the sweep's certify: section sets it",
    "workers": "resources.workers_per_trial sets it",
    "cpus_per_worker": "resources.cpus_per_worker sets it",
    "train_draws": "the training draws are denoised once for every trial; set it in base",
    "train_store": "the sweep makes its training draws; set train_draws in base",
    "proxy_store": "the sweep makes the proxy's draws",
    # Trials are compared image by image: each must train on, and be cut and ranked on, the
    # same images as every other.
    "val_images": "every trial ranks on the same validation hold-out; set it in base",
    "val_seed": "every trial ranks on the same validation hold-out; set it in base",
    "max_train_images": "every trial trains on the same images; set it in base",
    "proxy_images": "ASHA cuts trials on the proxy: it certifies the same images in each; "
                    "set it in base",
    "dataset": "every trial trains and ranks on the same images; set it in base",
    "data_root": "every trial trains and ranks on the same images; set it in base",
    "image_size": "every trial trains and ranks on the same images; set it in base",
}
# Integer ranges up to this many values are validated value by value (base checks such as
# effective_batch_size % batch_size are not intervals); wider ones by their bounds.
MAX_ENUMERATED_INTS = 1024


def base_key_names() -> list[str]:
    """The base keys as users write them (``lambda``, not ``adv_weight``)."""
    return list(TrainConfig().to_dict())


def _integer_keys() -> set[str]:
    """Base keys (as users write them) that take only integers, ``None`` aside."""
    user_keys = {attribute: user for user, attribute in RENAMED.items()}
    hints = typing.get_type_hints(TrainConfig)
    return {user_keys.get(name, name) for name, hint in hints.items()
            if hint is int or set(typing.get_args(hint)) == {int, type(None)}}


def _with(base_values: Mapping[str, Any], params: Mapping[str, Any]) -> TrainConfig:
    """The base with searched values applied (a variant's mapping applied key by key)."""
    values = dict(base_values)
    for key, value in params.items():
        if key == VARIANT_KEY:
            values.update(value)
        else:
            values[key] = value
    return from_mapping(values)


def parse_search(spec: Any, base: TrainConfig) -> dict[str, Distribution]:
    if not spec:
        raise CadisError("search is empty: name at least one base key to search, e.g. "
                         "search: {lambda: {uniform: [0.5, 8]}}")
    if not isinstance(spec, dict):
        raise CadisError(f"search must be a mapping of base keys to distributions, got {spec!r}")
    base_keys = base_key_names()
    search = {}
    for key, key_spec in spec.items():
        if key in NOT_SEARCHABLE:
            raise CadisError(f"search.{key}: not searchable: {NOT_SEARCHABLE[key]}")
        if key not in base_keys and key != VARIANT_KEY:
            raise CadisError(f"search.{key}: unknown key; allowed: {VARIANT_KEY} or a base key "
                             f"({', '.join(k for k in base_keys if k not in NOT_SEARCHABLE)})")
        search[key] = _parse_distribution(key, key_spec)
    base_values = base.to_dict()
    for key, distribution in search.items():
        if key == VARIANT_KEY:
            _check_variants(distribution, search, base_values)
        else:
            _check_values(key, distribution, base_values)
    _check_searched_keys_matter(search, base)
    if not any(d.kind == "grid" for d in search.values()):
        # Optuna's categorical distribution holds only scalars; Tune's grid holds anything.
        for key, distribution in search.items():
            if distribution.kind == "choice" and not all(
                    value is None or isinstance(value, (bool, int, float, str))
                    for value in distribution.values):
                raise CadisError(f"search.{key}: choice takes numbers, strings, booleans or null "
                                 "(Optuna's categories); use grid for lists and mappings")
    return search


def _check_searched_keys_matter(search: Mapping[str, Distribution], base: TrainConfig) -> None:
    """Refuse a searched key that every trial's method ignores (:data:`IGNORED_BY_METHOD`):
    its trials would differ in a name only."""
    method = search.get("method")
    variants = search.get(VARIANT_KEY)
    if method is not None:
        methods = set(method.values)
    elif variants is not None:
        methods = {variant.get("method", base.method) for variant in variants.values}
    else:
        methods = {base.method}
    for key in search:
        reasons = [IGNORED_BY_METHOD.get(name, {}).get(key) for name in sorted(methods)]
        if all(reasons):
            raise CadisError(f"search.{key}: searches nothing: every trial runs method "
                             f"{', '.join(sorted(methods))}, which ignores {key} ({reasons[0]}); "
                             f"search it with method ft_cadis or leave it out of search")


def _parse_distribution(key: str, spec: Any) -> Distribution:
    where = f"search.{key}"
    if not isinstance(spec, dict) or not spec:
        raise CadisError(f"{where}: write one of {', '.join(DISTRIBUTIONS)}, e.g. "
                         f"{{uniform: [0.5, 8]}}; got {spec!r}")
    unknown = [name for name in spec if name not in DISTRIBUTIONS]
    if unknown:
        raise CadisError(f"{where}: unknown distribution {unknown[0]!r}; allowed: "
                         f"{', '.join(DISTRIBUTIONS)}")
    if len(spec) > 1:
        raise CadisError(f"{where}: one distribution per key, got {' and '.join(spec)}")
    (kind, values), = spec.items()
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise CadisError(f"{where}: {kind} takes a non-empty list of values, got {values!r}")
        if key == VARIANT_KEY and kind != "grid":
            raise CadisError(f"{where}: only grid is allowed: a variant is a set of base keys "
                             f"applied together, each in its own trials; got {kind}")
        return Distribution(kind, tuple(values))
    if key == VARIANT_KEY:
        raise CadisError(f"{where}: only grid is allowed: a variant is a set of base keys "
                         f"applied together; got {kind}")
    if not isinstance(values, list) or len(values) != 2:
        raise CadisError(f"{where}: {kind} takes [low, high], got {values!r}")
    if kind == "int":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CadisError(f"{where}: int takes integer bounds [low, high], got {values!r}")
        low, high = values
    else:
        low, high = (number(value, f"{where} bound") for value in values)
    if not low < high:
        raise CadisError(f"{where}: {kind} needs low < high, got [{low}, {high}]"
                         + ("; for one value, leave the key out of search and set it in base"
                            if low == high else ""))
    if kind == "loguniform" and not low > 0:
        raise CadisError(f"{where}: loguniform needs low > 0, got [{low}, {high}]")
    return Distribution(kind, (low, high))


def _check_values(key: str, distribution: Distribution, base_values: Mapping[str, Any]) -> None:
    """Every value the distribution can produce must pass the base's validation."""
    if distribution.kind in ("uniform", "loguniform") and key in _integer_keys():
        raise CadisError(f"search.{key}: {key} takes integers but {distribution.kind} draws "
                         "fractions; use int")
    candidates: Sequence[Any] = distribution.values
    if distribution.kind == "int":
        low, high = distribution.values
        if high - low < MAX_ENUMERATED_INTS:
            candidates = range(low, high + 1)
    for value in candidates:
        try:
            _with(base_values, {key: value})
        except CadisError as error:
            raise CadisError(f"search.{key}: {error}") from None


def _check_variants(distribution: Distribution, search: Mapping[str, Distribution],
                    base_values: Mapping[str, Any]) -> None:
    base_keys = base_key_names()
    for index, variant in enumerate(distribution.values):
        where = f"search.{VARIANT_KEY}[{index}]"
        if not isinstance(variant, dict) or not variant:
            raise CadisError(f"{where}: a variant is a non-empty mapping of base keys, e.g. "
                             f"{{finetune: lora, lora_rank: 4}}; got {variant!r}")
        for key in variant:
            if key in NOT_SEARCHABLE:
                raise CadisError(f"{where}.{key}: not searchable: {NOT_SEARCHABLE[key]}")
            if key not in base_keys:
                raise CadisError(f"{where}.{key}: unknown key; allowed: a base key "
                                 f"({', '.join(k for k in base_keys if k not in NOT_SEARCHABLE)})")
            if key in search:
                raise CadisError(f"{where}.{key}: {key} is also searched on its own; search it "
                                 "in one place")
        try:
            _with(base_values, {VARIANT_KEY: variant})
        except CadisError as error:
            raise CadisError(f"{where}: {error}") from None


def largest_value(search: Mapping[str, Distribution], base: TrainConfig, key: str) -> float:
    """The largest value of a numeric base key over every trial of the search."""
    base_value = base.to_dict()[key]
    distribution = search.get(key)
    if distribution is not None:
        if distribution.kind in RANGE_KINDS:
            return distribution.values[1]
        return max(float(value) for value in distribution.values)
    variants = search.get(VARIANT_KEY)
    if variants is not None:
        return max(float(variant.get(key, base_value)) for variant in variants.values)
    return base_value


def trial_config(sweep: SweepConfig, params: Mapping[str, Any]) -> TrainConfig:
    """One trial's training configuration: the base with the values Tune chose (``params``,
    keyed like :attr:`SweepConfig.search`; the incumbent's marker
    :data:`cadis.sweeps.spec.INCUMBENT_PARAM` is no base key and is left out). Validated; a
    combination of separately searched keys that the base refuses (checked one key at a time
    at load) raises here."""
    searched = {key: value for key, value in params.items() if key != INCUMBENT_PARAM}
    try:
        return _with(sweep.base.to_dict(), searched)
    except CadisError as error:
        raise CadisError(f"trial with {searched}: {error}") from None
