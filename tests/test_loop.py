"""One micro-step of the fine-tuning loop on tiny real models: the image-major layout of the
draws, a denoiser that no gradient reaches, and the loss scaled for gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from cadis.finetuning.config import METHODS, from_mapping
from cadis.finetuning.loop import DiffusionSpaceClassifier, _micro_step, denoise_draws
from cadis.finetuning.lora import apply_finetuning
from cadis.models.classifier import load_classifier
from cadis.smoothing.denoise import OneShotDenoiser
from cadis.smoothing.precision import FP32
from tests.conftest import TINY_VIT_ARGS, make_scheduler, make_tiny_unet

IMAGES = 4
DRAWS = 3
SIGMA = 0.25
# The methods that train: every entry of the methods table but "none", which certifies the
# classifier as it is and never takes a step.
TRAINING_METHODS = tuple(method for method in METHODS if method != "none")


def parts(method: str = "ft_cadis", **changes):
    """A LoRA classifier, a one-shot denoiser and a config for 4 images of 1x8x8, 3 draws."""
    torch.manual_seed(0)
    classifier = load_classifier("vit_tiny_patch16_224", num_classes=10, **TINY_VIT_ARGS)
    config = from_mapping({"method": method, "num_noises": DRAWS, "sigma": SIGMA,
                           "batch_size": IMAGES, "effective_batch_size": IMAGES,
                           "confidence_threshold": 0.0, **changes})
    apply_finetuning(classifier, config.finetune_config())
    denoiser = OneShotDenoiser(make_tiny_unet(), make_scheduler(), SIGMA)
    # Image i is flat at a level of its own: its draws are recognisable wherever they go.
    levels = torch.linspace(0.1, 0.9, IMAGES)
    images = levels.view(-1, 1, 1, 1).expand(IMAGES, 1, 8, 8).contiguous()
    labels = torch.arange(IMAGES)
    return classifier, denoiser, config, images, labels


def step(classifier, denoiser, config, images, labels, seed: int = 1) -> dict[str, float]:
    torch.manual_seed(seed)
    denoised = denoise_draws(images, denoiser, config.sigma, config.num_noises, FP32)
    return _micro_step(denoised, labels, classifier, DiffusionSpaceClassifier(classifier), None,
                       config, config.loss_config(), amp=False)


def test_the_draws_of_an_image_are_adjacent_rows():
    classifier, denoiser, config, images, labels = parts()
    seen = []
    denoiser.unet.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    step(classifier, denoiser, config, images, labels)
    x_t = seen[0]  # sqrt(alpha_bar) * (2 (x + delta) - 1): one row per draw
    assert x_t.shape[0] == IMAGES * DRAWS
    levels = x_t.mean(dim=(1, 2, 3)) / denoiser.alpha_bar ** 0.5
    expected = 2 * images.mean(dim=(1, 2, 3)) - 1
    # Row i * M + j is draw j of image i: image-major, the [B, M, C] layout of the losses.
    assert torch.allclose(levels.view(IMAGES, DRAWS),
                          expected.view(-1, 1).expand(IMAGES, DRAWS), atol=0.15)
    # The draws differ: fresh noise for each.
    assert not torch.equal(x_t[0], x_t[1])


@pytest.mark.parametrize("method", TRAINING_METHODS)
def test_no_gradient_reaches_the_denoiser_and_the_trained_weights_get_one(method):
    classifier, denoiser, config, images, labels = parts(method)
    logged = step(classifier, denoiser, config, images, labels)
    assert all(p.grad is None and not p.requires_grad for p in denoiser.parameters())
    trained = [p for p in classifier.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert any(float(p.grad.abs().sum()) > 0 for p in trained)
    frozen = [p for p in classifier.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert {"loss", "sce", "madv", "hallucination_rate", "train_denoised_accuracy"} <= set(logged)


@pytest.mark.parametrize("method", TRAINING_METHODS)
def test_the_loss_is_divided_by_the_accumulation_steps(method):
    # The same micro-batch and noise: with 2 micro-batches per step each contributes half.
    grads = {}
    for effective in (IMAGES, 2 * IMAGES):
        classifier, denoiser, config, images, labels = parts(method,
                                                             effective_batch_size=effective)
        logged = step(classifier, denoiser, config, images, labels)
        grads[effective] = [p.grad.clone() for p in classifier.parameters() if p.requires_grad]
        loss = logged["loss"]
        assert config.accumulation_steps == effective // IMAGES
    for single, accumulated in zip(grads[IMAGES], grads[2 * IMAGES]):
        assert torch.allclose(accumulated * 2, single, rtol=1e-5, atol=1e-8)
    assert loss > 0  # the logged loss is the micro-batch's own, unscaled


def test_a_non_finite_loss_stops_training_before_the_optimizer_steps(tiny_models_dir, tmp_path):
    from cadis.errors import CadisError
    from cadis.finetuning.fit import LocalSession
    from cadis.finetuning.loop import NonFiniteLoss, train_loop

    # An lr of 1e30 makes the first step's weights enormous: the second step's loss is not
    # finite. Deterministic: the seed fixes the data order and the noise.
    config = from_mapping({"models": str(tiny_models_dir), "epochs": 2, "max_steps_per_epoch": 3,
                           "batch_size": 4, "effective_batch_size": 4, "val_images": 20,
                           "proxy_images": 4, "proxy_n": 10, "proxy_n0": 4, "warmup_steps": 0,
                           "lr": 1e30})
    session = LocalSession(tmp_path, torch.device("cpu"), resume=False)
    with pytest.raises(NonFiniteLoss) as stopped:
        train_loop(config, session, progress=False)
    message = str(stopped.value)
    assert isinstance(stopped.value, CadisError) and "\n" not in message
    assert message.startswith("epoch 1, step 2: the loss is nan (")
    assert "selective cross-entropy (SCE) = nan" in message
    assert "training stopped before the optimizer step" in message
    assert not session.checkpoints.exists()  # the epoch never ended: no checkpoint of it


@pytest.mark.parametrize("logged, named, unnamed", [
    ({"loss": float("nan"), "sce": float("nan"), "madv": 0.5},
     ["selective cross-entropy (SCE) = nan"], "MAdv"),
    ({"loss": float("inf"), "sce": 0.5, "madv": float("inf")},
     ["adversarial (MAdv) = inf"], "SCE"),
    ({"loss": float("nan"), "sce": float("inf"), "madv": float("nan")},
     ["selective cross-entropy (SCE) = inf", "adversarial (MAdv) = nan"], None),
])
def test_the_error_names_each_term_that_went_non_finite(logged, named, unnamed):
    from cadis.finetuning.loop import NonFiniteLoss, check_finite_loss

    check_finite_loss({"loss": 1.0, "sce": 0.5, "madv": 0.5}, 1, 1)  # finite: nothing raised
    with pytest.raises(NonFiniteLoss, match="^epoch 3, step 17: ") as stopped:
        check_finite_loss(logged, 3, 17)
    assert all(name in str(stopped.value) for name in named)
    assert unnamed is None or unnamed not in str(stopped.value)


# ------------------------------------------------- batch norm: clean and attacked apart


def bn_parts():
    """A fully fine-tuned tiny CNN with batch norm and denoised draws of 4 images."""
    from tests.test_finetune import tiny_cnn

    classifier = tiny_cnn(num_classes=10)
    config = from_mapping({"num_noises": DRAWS, "sigma": SIGMA, "batch_size": IMAGES,
                           "effective_batch_size": IMAGES, "confidence_threshold": 0.0,
                           "finetune": "full"})
    torch.manual_seed(2)
    denoised = torch.rand(IMAGES * DRAWS, 1, 8, 8) * 2 - 1
    return classifier, config, denoised, torch.arange(IMAGES)


def trained_forwards(classifier) -> list[torch.Tensor]:
    """The inputs of every forward that trains (train mode, with gradient), as they come."""
    seen = []
    classifier.register_forward_hook(
        lambda module, args, output: seen.append(args[0].detach().clone())
        if module.training and torch.is_grad_enabled() else None)
    return seen


@pytest.mark.parametrize("model, forwards", [("vit", [2 * IMAGES * DRAWS]),
                                             ("cnn", [IMAGES * DRAWS, IMAGES * DRAWS])])
def test_a_batch_norm_model_gets_two_forwards_and_any_other_one(model, forwards):
    from cadis.finetuning.loop import shares_batch_statistics

    if model == "vit":
        classifier, denoiser, config, images, labels = parts()
        torch.manual_seed(1)
        denoised = denoise_draws(images, denoiser, config.sigma, config.num_noises, FP32)
    else:
        classifier, config, denoised, labels = bn_parts()
    assert shares_batch_statistics(classifier) == (model == "cnn")
    seen = trained_forwards(classifier)
    _micro_step(denoised, labels, classifier, DiffusionSpaceClassifier(classifier), None,
                config, config.loss_config(), amp=False)
    assert [len(inputs) for inputs in seen] == forwards


def test_with_batch_norm_the_running_statistics_are_those_of_two_forwards():
    import copy

    from torch.nn.modules.batchnorm import _BatchNorm

    classifier, config, denoised, labels = bn_parts()
    before = copy.deepcopy(classifier)
    seen = trained_forwards(classifier)
    _micro_step(denoised, labels, classifier, DiffusionSpaceClassifier(classifier), None,
                config, config.loss_config(), amp=False)
    clean, attacked = seen
    assert torch.equal(clean, (denoised + 1) / 2)  # the clean draws first, alone

    def running(model):
        return [t for m in model.modules() if isinstance(m, _BatchNorm)
                for t in (m.running_mean, m.running_var)]

    two, one = copy.deepcopy(before), copy.deepcopy(before)
    with torch.no_grad():
        two(clean), two(attacked)
        one(torch.cat([clean, attacked]))
    assert all(torch.allclose(a, b) for a, b in zip(running(classifier), running(two)))
    # What one shared forward would have left differs: the test can tell them apart.
    assert not all(torch.allclose(a, b) for a, b in zip(running(classifier), running(one)))


# ------------------------------------------------------ the denoiser's one precision


@pytest.mark.parametrize("name", ["auto", "fp32", "bf16"])
def test_training_denoises_in_the_precision_certification_does(name):
    from cadis.smoothing.precision import resolve_precision
    from cadis.smoothing.smooth import evaluating

    cpu = torch.device("cpu")
    _, denoiser, config, images, _ = parts(**{"certify.precision": name})
    dtypes = []
    denoiser.unet.register_forward_pre_hook(lambda module, args: dtypes.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    draws = denoise_draws(images, denoiser, config.sigma, config.num_noises,
                          config.denoiser_precision(cpu))
    # Certification's base evaluates under evaluating() in certify.precision for the device.
    with evaluating(denoiser, cpu, resolve_precision(name, cpu)):
        denoiser(images)
    training, certification = dtypes
    assert training == certification == resolve_precision(name, cpu).autocast
    assert config.denoiser_precision(cpu) is resolve_precision(config.certify.precision, cpu)
    assert draws.dtype == torch.float32


def test_the_loop_steps_with_the_recipe(tiny_models_dir, tmp_path, monkeypatch):
    import cadis.finetuning.loop as loop
    from cadis.finetuning.fit import LocalSession
    from cadis.finetuning.schedule import cosine_between

    calls = {"clip": [], "precision": []}
    clip, denoise = loop.clip_gradients, loop.denoise_draws
    monkeypatch.setattr(loop, "clip_gradients", lambda params, bound, scope: calls["clip"].append(
        (bound, scope)) or clip(params, bound, scope))
    monkeypatch.setattr(loop, "denoise_draws", lambda *args: calls["precision"].append(
        args[-1].name) or denoise(*args))
    config = from_mapping({"models": str(tiny_models_dir), "epochs": 1, "max_steps_per_epoch": 2,
                           "batch_size": 4, "effective_batch_size": 4, "val_images": 20,
                           "proxy_images": 4, "proxy_n": 10, "proxy_n0": 4, "warmup_steps": 0,
                           "layer_decay": 0.65, "grad_clip": 0.5, "weight_decay": 0.04,
                           "weight_decay_end": 0.4, "weight_decay_skip_1d": True,
                           "certify.precision": "bf16"})
    session = LocalSession(tmp_path, torch.device("cpu"), resume=False)
    reported = []
    monkeypatch.setattr(session, "report", lambda metrics, directory: reported.append(metrics))
    loop.train_loop(config, session, progress=False)
    assert calls["clip"] == [(0.5, "parameter")] * 2  # once per optimizer step
    assert calls["precision"] == ["bf16"] * 2
    [metrics] = reported
    assert metrics["weight_decay"] == cosine_between(1, 2, 0.04, 0.4)  # the last step's


# ------------------------------------------------- the proxy's own noise


@pytest.mark.parametrize("images, acr, se", [(4, 0.1875, 0.119678), (1, 0.5, None)])
def test_the_proxy_reports_the_standard_error_of_its_mean_radius(tiny_models_dir, monkeypatch,
                                                                 images, acr, se):
    """Per-image radii 0.5, 0.25, 0 (wrong class) and 0 (abstained): ACR 0.1875 and SE
    stdev / sqrt(4) = 0.2394 / 2; one image has no spread to estimate, so no SE."""
    from cadis.data import load_dataset, stratified_holdout
    from cadis.finetuning import loop
    from cadis.models.denoiser import load_denoiser
    from cadis.models.sources import ModelSources
    from cadis.smoothing.records import ABSTAIN, Record
    from cadis.tracking.contract import PROXY_ACR, PROXY_ACR_SE

    outcomes = [(0, 0.5), (0, 0.25), (1, 0.75), (ABSTAIN, 0.0)][:images]
    records = [Record.from_prediction(index, 0, predict, radius, 0.0)
               for index, (predict, radius) in enumerate(outcomes)]
    monkeypatch.setattr(loop, "certified_records", lambda *args: iter(records))
    config = from_mapping({"models": str(tiny_models_dir), "val_images": 20,
                           "proxy_images": images, "proxy_n": 30, "proxy_n0": 5})
    sources = ModelSources.resolve(str(tiny_models_dir))
    dataset = load_dataset("digits", "train")
    _, validation = stratified_holdout(dataset.labels, config.val_images, config.val_seed)
    unet, scheduler = load_denoiser(sources.denoiser)
    metrics = loop.proxy_metrics(load_classifier(sources.classifier),
                                 OneShotDenoiser(unet, scheduler, config.sigma), dataset,
                                 validation, config, sources, 10, 8)
    assert metrics[PROXY_ACR] == pytest.approx(acr)
    assert metrics.get(PROXY_ACR_SE) == (None if se is None else pytest.approx(se, rel=1e-4))
