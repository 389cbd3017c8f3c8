"""FT-CADIS training: config validation, the loop in this process, resume, Ray Train workers."""

import json
import shutil

import pytest
import torch

from cadis.cli import main
from cadis.errors import CadisError
from cadis.finetuning.config import from_mapping
from tests.conftest import set_flags

# A few steps on digits with the tiny untrained models of conftest: exercises every stage.
TINY = ["epochs=1", "max_steps_per_epoch=2", "batch_size=4", "effective_batch_size=8",
        "val_images=20", "proxy_images=4", "proxy_n=10", "proxy_n0=4", "certify.n=20",
        "certify.n0=5", "certify.max_images=3", "certify.skip=1", "warmup_steps=1",
        "train_draws=0"]


def _train(models, out, *extra, flags=()):
    return main(["train", "sweeps/default.yaml", "--out", str(out), "--quiet", *flags,
                 *set_flags(f"models={models}", *TINY, *extra)])


@pytest.mark.parametrize("override,message", [
    ("lambda=-1", "lambda must be a finite number >= 0"),
    ("epsilon=-0.1", "epsilon must be a finite number >= 0"),
    ("num_noises=0", "num_noises must be an integer >= 1"),
    ("lora_rank=0", "lora_rank"),
    ("confidence_threshold=1.5", "confidence_threshold must be a number in [0, 1] or 'argmax'"),
    ("confidence_threshold=often", "confidence_threshold must be a number in [0, 1]"),
    ("method=magic", "method must be one of ft_cadis, denoised_ce, none"),
    ("finetune=half", "finetune must be one of lora, full"),
    ("nonsense=1", "unknown key 'nonsense'"),
    ("certify.n=0", "certify.n must be an integer >= 1"),
    ("certify.speed=2", "unknown key certify.speed"),
    ("effective_batch_size=10", "must be a multiple of batch_size"),
    ("lr=fast", "lr must be a number"),
])
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(CadisError) as error:
        from_mapping({}, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_yaml_numbers_and_user_names():
    config = from_mapping({"lambda": 4, "lr": "3e-4", "confidence_threshold": 0.7})
    assert config.adv_weight == 4.0 and config.lr == 3e-4 and config.confidence_threshold == 0.7
    assert config.to_dict()["lambda"] == 4.0 and "adv_weight" not in config.to_dict()
    baseline = from_mapping({"method": "denoised_ce"}).loss_config()
    assert baseline.adv_weight == 0 and baseline.confidence_threshold == 0


@pytest.mark.parametrize("override,message", [
    ("lora_target_modules=[query]", "lora_target_modules ['query'] match no module"),
    ("sigma=100", "beyond the denoiser's schedule"),
    ("models=/nonexistent/models", "has no manifest.json"),
])
def test_bad_input_fails_before_any_work(tiny_models_dir, tmp_path, capsys, override, message):
    out = tmp_path / "out"
    assert _train(tiny_models_dir, out, override) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_train_reports_metrics_checkpoints_and_certifies(tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    assert _train(tiny_models_dir, out) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1
    metrics = history[0]
    for key in ("sce", "madv", "hallucination_rate", "val_denoised_accuracy", "proxy_acr",
                "proxy_certified_accuracy_r0.0", "trainable_fraction", "global_step"):
        assert key in metrics
    assert metrics["global_step"] == 2 and 0 < metrics["trainable_fraction"] < 0.5
    assert 0 <= metrics["hallucination_rate"] <= 1
    checkpoint = out / "checkpoints" / "epoch_001"
    assert {p.name for p in checkpoint.iterdir()} == {"trained.safetensors", "finetune.json",
                                                      "optimizer.safetensors"}
    summary = json.loads((out / "certify_epoch_001" / "summary.json").read_text())
    assert summary["num_images"] == 3 and summary["checkpoint"] == str(checkpoint)
    assert json.loads((out / "config.json").read_text())["lambda"] == 2.0


def test_resume_continues_the_step_count(tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    assert _train(tiny_models_dir, out) == 0
    first = json.loads((out / "checkpoints" / "epoch_001" / "finetune.json").read_text())
    assert _train(tiny_models_dir, out, "epochs=2", flags=["--resume"]) == 0
    second = json.loads((out / "checkpoints" / "epoch_002" / "finetune.json").read_text())
    assert first["metadata"]["global_step"] == 2
    assert second["metadata"]["global_step"] == 4 and second["metadata"]["epoch"] == 2
    # The first epoch was not trained again: its checkpoint is untouched.
    assert json.loads((out / "checkpoints" / "epoch_001" / "finetune.json").read_text()) == first
    assert (out / "certify_epoch_001" / "records.tsv").is_file()
    assert (out / "certify_epoch_002" / "records.tsv").is_file()


def test_resumed_run_trains_exactly_as_an_uninterrupted_one(tiny_models_dir, tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_models_dir, straight, "epochs=2") == 0
    assert _train(tiny_models_dir, resumed, "epochs=2") == 0
    # Interrupt after epoch 1: drop the second epoch's checkpoint, then resume.
    shutil.rmtree(resumed / "checkpoints" / "epoch_002")
    assert _train(tiny_models_dir, resumed, "epochs=2", flags=["--resume"]) == 0
    first = load_file(str(straight / "checkpoints" / "epoch_002" / "trained.safetensors"))
    second = load_file(str(resumed / "checkpoints" / "epoch_002" / "trained.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_denoised_ce_skips_the_attack(tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    assert _train(tiny_models_dir, out, "method=denoised_ce") == 0
    metrics = json.loads((out / "history.json").read_text())[0]
    assert metrics["madv"] == 0 and metrics["hallucination_rate"] == 0


def test_method_none_certifies_the_off_the_shelf_model(tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    assert _train(tiny_models_dir, out, "method=none") == 0
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "certify" / "summary.json").read_text())["checkpoint"] is None


@pytest.mark.slow
def test_two_ray_train_workers_report_metrics_and_a_checkpoint(tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    assert _train(tiny_models_dir, out, "cpus_per_worker=0.5", "epochs=2",
                  flags=["--workers", "2"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[-1]["global_step"] == 4 and "proxy_acr" in history[-1]
    summary = json.loads((out / "certify_epoch_002" / "summary.json").read_text())
    checkpoint = summary["checkpoint"]
    assert checkpoint.startswith(str(out / "ray")) and summary["num_images"] == 3
