"""LoRA and full fine-tuning: what trains, what stays frozen, and checkpoints of only the former."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cadis.errors import CadisError
from cadis.finetuning.checkpoint import (
    FINETUNE_CONFIG,
    TRAINED_WEIGHTS,
    load_trained,
    save_trained,
    trained_state_dict,
)
from cadis.finetuning.lora import (
    FinetuneConfig,
    apply_finetuning,
    count_trainable,
    trainable_fraction,
)
from cadis.models.classifier import Classifier, load_classifier
from tests.conftest import TINY_VIT_ARGS

NUM_CLASSES = 3
BATCH = 4
SEED = 0
# A timm CNN of about 0.4 M parameters, with batch norm; fed at 16 x 16 instead of its 160 x 160.
TINY_CNN = "test_resnet"
TINY_CNN_INPUT = (16, 16)
LEARNING_RATE = 1e-2


def tiny_vit(**overrides) -> Classifier:
    torch.manual_seed(SEED)  # the same seed gives the same "off-the-shelf" weights every time
    args = {**TINY_VIT_ARGS, "num_classes": NUM_CLASSES, **overrides}
    return load_classifier("vit_tiny_patch16_224", **args)


def tiny_cnn(num_classes: int = NUM_CLASSES) -> Classifier:
    import timm

    torch.manual_seed(SEED)
    # timm zero-initialises each block's last batch-norm scale, which under LoRA stays frozen
    # at zero and cuts every gradient into the blocks; a pretrained model has none of that.
    model = timm.create_model(TINY_CNN, num_classes=num_classes, in_chans=1,
                              zero_init_last=False)
    return Classifier(model, input_size=TINY_CNN_INPUT)


BUILDERS = {"vit": tiny_vit, "cnn": tiny_cnn}


def images(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 1, 8, 8, generator=generator)


def labels(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)


def train_steps(classifier: Classifier, steps: int = 2) -> None:
    """AdamW on cross-entropy. Two steps: on the first, LoRA's A gets no gradient (B is 0).

    The optimiser is given every parameter on purpose, so frozen ones stay put only because
    they receive no gradient.
    """
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=LEARNING_RATE)
    classifier.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(classifier(images()), labels()).backward()
        optimizer.step()


def adapted_modules(classifier: Classifier) -> set[str]:
    return {name.split(".lora_A.")[0] for name, _ in classifier.model.named_parameters()
            if ".lora_A." in name}


def is_lora_or_head(name: str, head: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith(f"model.{head}.")


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_lora_trains_only_adapters_and_head(kind):
    classifier = apply_finetuning(BUILDERS[kind](), FinetuneConfig())
    head = classifier.model.pretrained_cfg["classifier"]
    assert 0 < trainable_fraction(classifier) < 0.5
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    assert all(is_lora_or_head(name, head) for name in trainable)
    assert {f"model.{head}.weight", f"model.{head}.bias"} <= trainable
    assert any(".lora_B." in name for name in trainable)

    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    train_steps(classifier)
    for name, parameter in classifier.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (name in trainable), name


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_injecting_lora_leaves_the_logits_unchanged(kind):
    classifier = BUILDERS[kind]().eval()
    with torch.no_grad():
        before = classifier(images())
        after = apply_finetuning(classifier, FinetuneConfig()).eval()(images())
    assert adapted_modules(classifier)
    assert torch.equal(before, after)


def test_full_mode_trains_everything():
    classifier = tiny_vit().requires_grad_(False)
    apply_finetuning(classifier, FinetuneConfig(mode="full"))
    trainable, total = count_trainable(classifier)
    assert trainable == total > 0
    assert trainable_fraction(classifier) == 1.0
    assert not adapted_modules(classifier)


def test_auto_targets_on_a_vit_are_the_qkv_projections():
    classifier = apply_finetuning(tiny_vit(), FinetuneConfig())
    assert adapted_modules(classifier) == {"blocks.0.attn.qkv"}


def test_auto_targets_on_a_cnn_are_its_convolutions_and_not_the_head():
    classifier = tiny_cnn()
    convolutions = {name for name, module in classifier.model.named_modules()
                    if isinstance(module, nn.Conv2d)}
    apply_finetuning(classifier, FinetuneConfig())
    assert classifier.model.pretrained_cfg["classifier"] == "fc"
    assert adapted_modules(classifier) == convolutions
    assert classifier.model.fc.weight.requires_grad and classifier.model.fc.bias.requires_grad


def test_explicit_targets_match_dotted_name_suffixes():
    config = FinetuneConfig(lora_target_modules=["attn.proj", "fc1"])
    classifier = apply_finetuning(tiny_vit(), config)
    # "attn.proj" must not catch patch_embed.proj, which merely ends in "proj".
    assert adapted_modules(classifier) == {"blocks.0.attn.proj", "blocks.0.mlp.fc1"}


@pytest.mark.parametrize("kind, mode", [("vit", "lora"), ("cnn", "lora"), ("vit", "full")])
def test_save_then_load_reproduces_the_trained_classifier(tmp_path, kind, mode):
    config = FinetuneConfig(mode=mode, lora_rank=2, lora_alpha=3.0)
    metadata = {"epoch": 2, "sigma": 0.25}
    trained = apply_finetuning(BUILDERS[kind](), config)
    train_steps(trained)  # also moves the CNN's batch-norm statistics, which must be saved
    save_trained(trained, tmp_path, config, metadata)

    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / TRAINED_WEIGHTS))
    assert saved.keys() == trained_state_dict(trained).keys()
    full_state = trained.state_dict()
    if mode == "lora":
        assert len(saved) < len(full_state)
        head = trained.model.pretrained_cfg["classifier"]
        parameters = dict(trained.named_parameters())
        assert all(is_lora_or_head(name, head) for name in saved if name in parameters)
    else:
        assert saved.keys() == full_state.keys()
    description = json.loads((tmp_path / FINETUNE_CONFIG).read_text())
    assert FinetuneConfig(**description["finetune"]) == config
    assert description["metadata"] == metadata
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [FINETUNE_CONFIG, TRAINED_WEIGHTS])

    fresh = BUILDERS[kind]()
    with torch.no_grad():
        untrained_logits = fresh.eval()(images(seed=2))
        loaded, loaded_metadata = load_trained(fresh, tmp_path)
        loaded_logits = loaded.eval()(images(seed=2))
        trained_logits = trained.eval()(images(seed=2))
    assert loaded is fresh
    assert loaded_metadata == metadata
    assert not torch.equal(untrained_logits, trained_logits)
    assert torch.equal(loaded_logits, trained_logits)


def test_saving_again_overwrites_the_checkpoint(tmp_path):
    config = FinetuneConfig()
    classifier = apply_finetuning(tiny_vit(), config)
    save_trained(classifier, tmp_path, config, {"epoch": 1})
    train_steps(classifier)
    save_trained(classifier, tmp_path, config, {"epoch": 2})
    loaded, metadata = load_trained(tiny_vit(), tmp_path)
    assert metadata == {"epoch": 2}
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images()), classifier.eval()(images()))


@pytest.mark.parametrize("other", [lambda: tiny_vit(embed_dim=32), lambda: tiny_vit(num_classes=5),
                                   lambda: tiny_cnn()],
                         ids=["wider-vit", "more-classes", "cnn"])
def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, other):
    config = FinetuneConfig()
    save_trained(apply_finetuning(tiny_vit(), config), tmp_path, config, {})
    with pytest.raises(CadisError, match="does not fit this classifier") as error:
        load_trained(other(), tmp_path)
    assert "\n" not in str(error.value)


def test_a_folder_without_finetune_json_is_refused(tmp_path):
    with pytest.raises(CadisError, match=f"not a cadis checkpoint \\(no {FINETUNE_CONFIG}\\)"):
        load_trained(tiny_vit(), tmp_path)


@pytest.mark.parametrize("setting, key", [
    ({"mode": "qlora"}, "finetune_mode"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_rank": 2.5}, "lora_rank"),
    ({"lora_alpha": 0.0}, "lora_alpha"),
    ({"lora_alpha": -8.0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_target_modules": []}, "lora_target_modules"),
    ({"lora_target_modules": "qkv"}, "lora_target_modules"),
])
def test_invalid_configs_name_the_key(setting, key):
    with pytest.raises(CadisError, match=key) as error:
        FinetuneConfig(**setting)
    assert "\n" not in str(error.value)


def test_target_modules_that_do_not_exist_are_named():
    config = FinetuneConfig(lora_target_modules=["qkv", "query"])
    with pytest.raises(CadisError, match=r"lora_target_modules \['query'\] match no module"):
        apply_finetuning(tiny_vit(), config)


def test_target_modules_peft_cannot_adapt_are_refused():
    config = FinetuneConfig(lora_target_modules=["norm1"])  # a LayerNorm
    with pytest.raises(CadisError, match="lora_target_modules") as error:
        apply_finetuning(tiny_vit(), config)
    assert "\n" not in str(error.value)


def test_adapters_are_not_injected_twice():
    classifier = apply_finetuning(tiny_vit(), FinetuneConfig())
    with pytest.raises(CadisError, match="already has LoRA adapters"):
        apply_finetuning(classifier, FinetuneConfig())


def test_restore_continues_weights_optimizer_and_random_state(tmp_path):
    from cadis.finetuning.checkpoint import OPTIMIZER_STATE, read_metadata, restore_training_state

    config = FinetuneConfig(mode="lora", lora_rank=2)
    trained = apply_finetuning(tiny_vit(), config)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=0.1)
    trained(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    torch.manual_seed(123)
    save_trained(trained, tmp_path, config, {"epoch": 3, "global_step": 7}, optimizer=optimizer)
    after_save = torch.rand(4)
    assert (tmp_path / OPTIMIZER_STATE).is_file()

    resumed = apply_finetuning(tiny_vit(), config)
    resumed_optimizer = torch.optim.AdamW(
        [p for p in resumed.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(999)  # the restore must bring the saved stream back
    metadata = restore_training_state(tmp_path, resumed, resumed_optimizer)
    assert metadata == {"epoch": 3, "global_step": 7} == read_metadata(tmp_path)
    assert torch.equal(torch.rand(4), after_save)
    saved_weights = dict(trained.named_parameters())
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, saved_weights[name]), name
    by_name = {name: p for name, p in trained.named_parameters()}
    resumed_by_name = {name: p for name, p in resumed.named_parameters()}
    for name, parameter in resumed_by_name.items():
        if not parameter.requires_grad:
            continue
        original = optimizer.state[by_name[name]]
        restored = resumed_optimizer.state[parameter]
        assert set(restored) == set(original)
        assert all(torch.equal(torch.as_tensor(restored[key]), torch.as_tensor(original[key]))
                   for key in original)


def test_a_checkpoint_without_optimizer_state_cannot_resume_training(tmp_path):
    from cadis.finetuning.checkpoint import restore_training_state

    config = FinetuneConfig(mode="lora", lora_rank=2)
    save_trained(apply_finetuning(tiny_vit(), config), tmp_path, config, {"epoch": 1})
    classifier = apply_finetuning(tiny_vit(), config)
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad])
    with pytest.raises(CadisError, match="no readable optimizer.safetensors"):
        restore_training_state(tmp_path, classifier, optimizer)
