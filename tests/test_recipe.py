"""The reference recipe as settings: their validation, the weight-decay schedule, the
optimizer's parameter groups (layer-wise lr decay, no decay for biases and 1-D parameters),
gradient clipping and drop-path, on tiny timm models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cadis.errors import CadisError
from cadis.finetuning.config import TrainConfig, from_mapping
from cadis.finetuning.lora import apply_finetuning
from cadis.finetuning.optimizer import (
    LR_SCALE,
    WEIGHT_DECAY_SCALE,
    clip_gradients,
    layer_ids,
    make_optimizer,
    parameter_groups,
    set_hyperparameters,
)
from cadis.finetuning.schedule import cosine_between
from cadis.models.classifier import load_classifier
from tests.conftest import TINY_VIT_ARGS
from tests.test_finetune import tiny_cnn

DECAY = 0.5
DEPTH = 2


def vit(depth: int = DEPTH, **args) -> nn.Module:
    torch.manual_seed(0)
    return load_classifier("vit_tiny_patch16_224", num_classes=3,
                           **{**TINY_VIT_ARGS, "depth": depth}, **args).model


# ------------------------------------------------------------------------------ settings


def test_the_defaults_are_off():
    config = TrainConfig()
    assert (config.layer_decay, config.grad_clip, config.weight_decay_end,
            config.weight_decay_skip_1d, config.drop_path, config.attack_restandardize) == (
        1.0, None, None, False, 0.0, False)


@pytest.mark.parametrize("changes, message", [
    ({"layer_decay": 0.0}, "layer_decay must be a number in (0, 1]"),
    ({"layer_decay": 1.5}, "layer_decay must be a number in (0, 1]"),
    ({"grad_clip": 0.0}, "grad_clip must be a finite number > 0, or null"),
    ({"grad_clip": -1.0}, "grad_clip must be a finite number > 0, or null"),
    ({"grad_clip": float("inf")}, "grad_clip must be a finite number > 0, or null"),
    ({"grad_clip": "big"}, "grad_clip must be a number"),
    ({"grad_clip_scope": "layer"}, "grad_clip_scope must be one of parameter, total"),
    ({"weight_decay_end": -0.1}, "weight_decay_end must be a finite number >= 0"),
    ({"drop_path": 1.0}, "drop_path must be a number in [0, 1)"),
    ({"drop_path": -0.1}, "drop_path must be a number in [0, 1)"),
    ({"lora_alpha": "double"}, "lora_alpha must be a number > 0 or 'rank'"),
    ({"lora_alpha": 0}, "lora_alpha must be a number > 0"),
    ({"attack_restandardize": True, "train_draws": 4}, "attack_restandardize needs train_draws: 0"),
])
def test_a_bad_recipe_setting_names_its_key_and_range(changes, message):
    with pytest.raises(CadisError) as refused:
        from_mapping(changes)
    assert str(refused.value).startswith(message)


def test_set_reads_the_settings_as_numbers_and_rank_as_the_lora_scale_one():
    config = from_mapping({}, ["grad_clip=3e-1", "weight_decay_end=4e-1", "layer_decay=0.65",
                               "lora_alpha=rank", "lora_rank=8"])
    assert (config.grad_clip, config.weight_decay_end, config.layer_decay) == (0.3, 0.4, 0.65)
    finetune = config.finetune_config()
    assert finetune.lora_alpha / finetune.lora_rank == 1.0
    assert from_mapping({"lora_alpha": "1e1"}).finetune_config().lora_alpha == 10.0


def test_the_sweep_schema_accepts_and_searches_the_new_keys():
    from cadis.sweeps.parse import sweep_from_mapping
    from tests.test_sweep_config import search, with_changes

    sweep = sweep_from_mapping(with_changes(
        base={"layer_decay": 0.65, "grad_clip": 0.3, "weight_decay_end": 0.4,
              "weight_decay_skip_1d": True, "drop_path": 0.1, "lora_alpha": "rank"},
        search={"layer_decay": {"uniform": [0.5, 1.0]}, "grad_clip": {"choice": [0.3, 1.0]},
                "drop_path": {"uniform": [0.0, 0.3]}}))
    assert set(sweep.search) == {"layer_decay", "grad_clip", "drop_path"}
    assert (sweep.base.layer_decay, sweep.base.lora_alpha) == (0.65, "rank")
    with pytest.raises(CadisError, match="^search.layer_decay: layer_decay must be"):
        sweep_from_mapping(search(layer_decay={"uniform": [0.5, 1.5]}))


# ------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("step, expected", [(0, 0.04), (50, 0.22), (100, 0.4), (150, 0.4)])
def test_the_weight_decay_follows_a_cosine_from_start_to_end(step, expected):
    assert math.isclose(cosine_between(step, 100, 0.04, 0.4), expected, rel_tol=1e-12)


def test_no_end_is_a_constant_weight_decay():
    assert {cosine_between(step, 10, 0.01, None) for step in range(12)} == {0.01}


# ------------------------------------------------------------------------ parameter groups


@pytest.mark.parametrize("name, layer", [
    ("cls_token", 0), ("pos_embed", 0), ("patch_embed.proj.weight", 0),
    ("blocks.0.attn.qkv.weight", 1), ("blocks.1.mlp.fc2.bias", 2),
    ("norm.weight", DEPTH + 1), ("head.weight", DEPTH + 1),
])
def test_a_vit_gets_the_reference_layer_ids(name, layer):
    ids, top = layer_ids(vit())
    assert top == DEPTH + 1 and ids[name] == layer


def test_each_vit_layer_learns_layer_decay_times_slower_than_the_one_above():
    model = vit()
    ids, top = layer_ids(model)
    optimizer = make_optimizer(model, 1e-3, 0.05, DECAY, skip_1d=False)
    set_hyperparameters(optimizer, lr=1e-3, weight_decay=0.05)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert math.isclose(lr_of[id(parameter)], 1e-3 * DECAY ** (top - ids[name]))
    assert sum(len(group["params"]) for group in optimizer.param_groups) == \
        len(list(model.parameters()))


def test_lora_adapters_get_their_blocks_rate_and_frozen_weights_no_group():
    classifier = load_classifier("vit_tiny_patch16_224", num_classes=3,
                                 **{**TINY_VIT_ARGS, "depth": DEPTH})
    apply_finetuning(classifier, from_mapping({}).finetune_config())
    groups = parameter_groups(classifier.model, DECAY, skip_1d=False)
    scale_of = {id(p): group[LR_SCALE] for group in groups for p in group["params"]}
    named = dict(classifier.model.named_parameters())
    adapter = next(n for n in named if n.startswith("blocks.0.") and "lora_A" in n)
    assert scale_of[id(named[adapter])] == DECAY ** DEPTH  # block 0 is layer 1 of top 3
    assert scale_of[id(named["head.weight"])] == 1.0
    trainable = {id(p) for p in classifier.model.parameters() if p.requires_grad}
    assert set(scale_of) == trainable


def test_a_cnn_gets_timms_layer_grouping_stem_slowest_head_fastest():
    model = tiny_cnn().model
    groups = parameter_groups(model, DECAY, skip_1d=False)
    scale_of = {id(p): group[LR_SCALE] for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    scales = sorted({group[LR_SCALE] for group in groups})
    assert scale_of[id(named["fc.weight"])] == 1.0
    assert scale_of[id(named["conv1.0.weight"])] == scales[0] < DECAY ** 3


def test_a_model_without_layers_takes_only_layer_decay_one():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(CadisError, match="layer_decay needs a model with layers.*layer_decay: 1"):
        parameter_groups(model, DECAY, skip_1d=False)
    [group] = parameter_groups(model, 1.0, skip_1d=False)
    assert group[LR_SCALE] == 1.0 and len(group["params"]) == 4


@pytest.mark.parametrize("skip_1d", [True, False])
def test_biases_and_1d_parameters_skip_weight_decay_when_asked(skip_1d):
    model = vit()
    optimizer = make_optimizer(model, 1e-3, 0.05, 1.0, skip_1d=skip_1d)
    set_hyperparameters(optimizer, lr=1e-3, weight_decay=0.2)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups
                for p in group["params"]}
    for name, parameter in model.named_parameters():
        one_d = parameter.ndim <= 1 or name.endswith(".bias")
        assert decay_of[id(parameter)] == (0.0 if skip_1d and one_d else 0.2)
    assert {group[WEIGHT_DECAY_SCALE] for group in optimizer.param_groups} == (
        {0.0, 1.0} if skip_1d else {1.0})


# ----------------------------------------------------------------------------- clipping


def gradients(*scales: float) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    parameters = [nn.Parameter(torch.zeros(5)) for _ in scales]
    for parameter, scale in zip(parameters, scales):
        parameter.grad = scale * torch.randn(5, generator=generator)
    return parameters


def test_per_parameter_clipping_bounds_each_tensor_and_leaves_small_ones():
    parameters = gradients(10.0, 0.01)
    small = parameters[1].grad.clone()
    clip_gradients(parameters, 0.3, "parameter")
    assert math.isclose(float(parameters[0].grad.norm()), 0.3, rel_tol=1e-4)
    assert torch.equal(parameters[1].grad, small)


def test_total_clipping_bounds_the_norm_of_all_gradients_together():
    parameters = gradients(10.0, 0.01)
    ratio = float(parameters[0].grad.norm() / parameters[1].grad.norm())
    clip_gradients(parameters, 0.3, "total")
    total = torch.cat([p.grad for p in parameters]).norm()
    assert math.isclose(float(total), 0.3, rel_tol=1e-4)
    assert math.isclose(float(parameters[0].grad.norm() / parameters[1].grad.norm()), ratio,
                        rel_tol=1e-4)  # one factor for all: directions kept


def test_no_clip_leaves_the_gradients():
    parameters = gradients(10.0)
    before = parameters[0].grad.clone()
    clip_gradients(parameters, None, "parameter")
    assert torch.equal(parameters[0].grad, before)


# ---------------------------------------------------------------------------- drop path


def test_drop_path_builds_stochastic_depth_into_the_classifier():
    from timm.layers import DropPath

    rates = [m.drop_prob for m in vit(drop_path=0.2).modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    assert not [m for m in vit().modules() if isinstance(m, DropPath)]


def test_drop_path_on_a_model_that_drops_nothing_is_an_error():
    with pytest.raises(CadisError, match="^drop_path 0.2: classifier .* has no drop-path layer"):
        vit(depth=1, drop_path=0.2)  # timm's rates start at 0: one block drops nothing


# ---------------------------------------------------------------------------- sweep files


@pytest.mark.parametrize("name, expected", [
    # layer_decay, weight_decay, weight_decay_end, skip_1d, grad_clip, drop_path
    ("cifar10", (0.65, 0.04, 0.4, True, 0.3, 0.2)),
    ("imagenet", (0.65, 0.04, 0.4, True, 1.0, 0.0)),
    ("default", (1.0, 0.01, None, False, None, 0.0)),  # the embedded default: unchanged
])
def test_the_sweep_files_carry_the_reference_recipe(name, expected):
    from pathlib import Path

    from cadis.sweeps.parse import load_sweep

    base = load_sweep(Path(__file__).parent.parent / "sweeps" / f"{name}.yaml").base
    assert (base.layer_decay, base.weight_decay, base.weight_decay_end,
            base.weight_decay_skip_1d, base.grad_clip, base.drop_path) == expected
    assert base.grad_clip_scope == "parameter"
    if base.finetune == "lora":
        scale = base.finetune_config().lora_alpha / base.lora_rank
        assert scale == (1.0 if name == "imagenet" else 2.0)
