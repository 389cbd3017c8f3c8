"""`cadis certify` and `cadis analyze` end to end on tiny local models and digits."""

import json

import pytest

from cadis.cli import main
from cadis.smoothing.records import read_records
from cadis.smoothing.sequential import draws_to_reach

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _certify(models, out, *extra):
    return main(["certify", "--models", str(models), "--sigma", "0.5", "--n", "40", "--n0", "10",
                 "--skip", "3", "--out", str(out), "--quiet", *extra])


def test_certify_writes_records_summary_and_plot(tiny_models_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _certify(tiny_models_dir, out, "--max-images", "4") == 0
    records = read_records(out / "records.tsv")
    assert [r.idx for r in records] == [0, 3, 6, 9]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 4 and summary["n"] == 40 and summary["sigma"] == 0.5
    assert summary["certified_accuracy"]["0.0"] == pytest.approx(
        sum(r.correct for r in records) / 4)
    assert "0.25" in summary["certified_accuracy"] and "acr_grid" not in summary
    assert (out / "certified_accuracy.png").read_bytes().startswith(PNG_SIGNATURE)
    table = capsys.readouterr().out
    assert "sigma=0.5" in table and "ACR" in table


def test_certify_settings_name_the_models_by_hash(tiny_models_dir, tmp_path):
    import shutil

    from cadis.models.identity import model_hashes
    from cadis.models.sources import ModelSources

    moved = tmp_path / "moved"
    shutil.copytree(tiny_models_dir, moved)
    for models, out in ((tiny_models_dir, tmp_path / "run"), (moved, tmp_path / "again")):
        assert _certify(models, out, "--max-images", "1") == 0
    named = [json.loads((tmp_path / run / "settings.json").read_text())["model_hashes"]
             for run in ("run", "again")]
    # The same files in another folder are the same models.
    assert named[0] == named[1] == model_hashes(ModelSources.resolve(str(tiny_models_dir)))
    assert all(len(named[0][role]) == 64 for role in ("classifier", "denoiser"))


def test_certify_resumes_only_missing_images(tiny_models_dir, tmp_path):
    out = tmp_path / "run"
    assert _certify(tiny_models_dir, out, "--max-images", "2") == 0
    first = (out / "records.tsv").read_text().splitlines()
    assert _certify(tiny_models_dir, out, "--max-images", "5") == 0
    second = (out / "records.tsv").read_text().splitlines()
    assert second[:len(first)] == first and len(second) == len(first) + 3


@pytest.mark.parametrize("args,message", [
    (["--sigma", "0"], "sigma must be > 0"),
    (["--sigma", "-0.5"], "sigma must be > 0"),
    (["--alpha", "1.5"], "alpha must be a number strictly between 0 and 1"),
    (["--n", "0"], "n must be an integer >= 1"),
    (["--n0", "0"], "n0 must be an integer >= 1"),
    (["--skip", "0"], "skip must be an integer >= 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--precision", "fp8"], "unknown precision 'fp8'; allowed: auto, fp32, bf16, fp16"),
    (["--precision", "fp16"], "precision fp16 does not run on cpu"),
])
def test_bad_input_is_one_line_and_exit_two(tiny_models_dir, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = main(["certify", "--models", str(tiny_models_dir), "--sigma", "0.5", "--n", "10",
                 "--n0", "5", "--max-images", "1", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (out / "records.tsv").exists()


def test_missing_models_directory(tmp_path, capsys):
    code = main(["certify", "--models", str(tmp_path / "nope"), "--sigma", "0.5",
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "has no manifest.json" in capsys.readouterr().err


def test_out_with_other_settings_is_refused_untouched(tiny_models_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _certify(tiny_models_dir, out, "--max-images", "2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(["certify", "--models", str(tiny_models_dir), "--sigma", "0.25", "--n", "40",
                 "--n0", "10", "--skip", "3", "--max-images", "3", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "different settings" in err and "sigma" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_analyze_puts_runs_side_by_side(tiny_models_dir, tmp_path, capsys):
    for name in ("a", "b"):
        assert _certify(tiny_models_dir, tmp_path / name, "--max-images", "3") == 0
    capsys.readouterr()
    plot = tmp_path / "curves.png"
    assert main(["analyze", str(tmp_path / "a"), str(tmp_path / "b" / "records.tsv"),
                 "--labels", "first", "second", "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    # Two runs of the same settings on the same images: side by side, then paired.
    header = next(line for line in table.splitlines() if line.startswith("| radius"))
    assert header == "| radius | first | second |"
    assert "| radius | second − first | 95% interval |" in table
    assert "noise draws the same for each image (seed 0, per-image generators)" in table
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert main(["analyze", str(tmp_path / "a"), "--format", "csv", "--radii", "0,0.5"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert len(csv) == 4  # header, two radii, ACR


def test_analyze_missing_file_and_label_count(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing.tsv")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sequential_certify_records_draws_and_keeps_its_own_folder(tiny_models_dir, tmp_path,
                                                                   capsys):
    out = tmp_path / "sequential"
    assert _certify(tiny_models_dir, out, "--max-images", "3", "--sequential",
                    "--radii", "0,0.25", "--n", "200") == 0
    records = read_records(out / "records.tsv")
    assert (out / "records.tsv").read_text().splitlines()[0].endswith("\tdraws")
    assert all(10 + 1 <= r.draws <= 10 + 200 for r in records)
    assert all(r.radius in (0.0, 0.25) for r in records)  # grid radii
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sequential" and summary["acr_over"] == "grid"
    # Its ACR is a grid ACR, named so; the continuous one needs fixed n (no acr_grid there).
    assert summary["acr_grid"] == summary["acr"] == pytest.approx(
        sum(r.radius for r in records if r.correct) / 3)
    assert summary["mean_draws"] == pytest.approx(sum(r.draws for r in records) / 3)
    assert summary["looks"] == [21, 121, 200] and summary["radii"] == [0.0, 0.25]
    assert "sequential" in capsys.readouterr().out
    # Fixed-n records never join a sequential folder (nor the other way round).
    assert _certify(tiny_models_dir, out, "--max-images", "3", "--radii", "0,0.25",
                    "--n", "200") == 2
    assert len(read_records(out / "records.tsv")) == 3


def test_sequential_certify_without_radii_decides_the_grid_radii_n_can_reach(
        tiny_models_dir, tmp_path):
    out = tmp_path / "sequential-grid"
    assert _certify(tiny_models_dir, out, "--max-images", "2", "--sequential",
                    "--n", "200") == 0
    summary = json.loads((out / "summary.json").read_text())
    grid = [float(radius) for radius in summary["certified_accuracy"]]
    reachable = [r for r in grid if draws_to_reach(r, 0.5, 0.001) <= 200]
    # The table's grid stops where n = 200 stops (0.87 at sigma 0.5): no column of zeros that
    # only n makes; the sequential test decides every radius of it.
    assert grid == [0.0, 0.25, 0.5, 0.75]
    assert summary["radii"] == reachable == grid


def _answers(out):
    """What a records folder says of each image, without the seconds it took."""
    return [(r.idx, r.label, r.predict, r.radius, r.draws) for r in read_records(out / "records.tsv")]


@pytest.mark.parametrize("mode", [[], ["--sequential", "--radii", "0,0.25", "--n", "200"]],
                         ids=["fixed-n", "sequential"])
def test_certify_from_stored_draws_makes_the_live_records_and_denoises_once(
        tiny_models_dir, tmp_path, capsys, monkeypatch, mode):
    draws = tmp_path / "draws"
    assert _certify(tiny_models_dir, tmp_path / "live", "--max-images", "4", *mode) == 0
    capsys.readouterr()
    for out, models in (("stored", str(tiny_models_dir)), ("again", tiny_models_dir.name)):
        # The second names the models folder relative to another working directory: the same
        # denoiser, so the same store.
        monkeypatch.chdir(tiny_models_dir.parent if out == "again" else tmp_path)
        assert main(["certify", "--models", models, "--sigma", "0.5", "--n", "40",
                     "--n0", "10", "--skip", "3", "--max-images", "4", *mode,
                     "--draws-dir", str(draws), "--out", str(tmp_path / out)]) == 0
        printed = capsys.readouterr()
        # The first certification denoises the draws into the store, the second only reads.
        assert ("denoising 4 images" in printed.out) == (out == "stored")
        assert _answers(tmp_path / out) == _answers(tmp_path / "live")
    (store,) = [folder for folder in draws.iterdir() if not folder.name.startswith(".")]
    settings = json.loads((tmp_path / "again" / "settings.json").read_text())
    assert settings["stored_draws"] == str(store) and store.name.startswith("test-")
    # A store's records pair with the live ones on the same draws.
    assert main(["analyze", str(tmp_path / "live"), str(tmp_path / "again")]) == 0
    assert "the same for each image" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--sequential", "--radii", "0.5,0.25"], "radii must be strictly increasing"),
    (["--sequential", "--radii", "0,1.0", "--n", "100"],
     "n = 100 draws cannot certify radius 1 at sigma 0.5 sequentially (alpha 0.001); it "
     "needs n >= 301"),
    (["--sequential", "--radii", "0", "--n0", "20"],
     "n (10), the most estimation draws the sequential test may spend on an image, is below "
     "n0 (20)"),
])
def test_sequential_bad_input_is_one_line_and_exit_two(tiny_models_dir, tmp_path, capsys, args,
                                                       message):
    out = tmp_path / "run"
    code = main(["certify", "--models", str(tiny_models_dir), "--sigma", "0.5", "--n", "10",
                 "--n0", "5", "--max-images", "1", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bf16_certify_says_its_precision_and_its_agreement_with_fp32(tiny_models_dir, tmp_path):
    out = tmp_path / "bf16"
    assert _certify(tiny_models_dir, out, "--max-images", "2", "--precision", "bf16") == 0
    settings = json.loads((out / "settings.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert settings["precision"] == "bf16" and settings["compiled"] is False
    assert summary["agreement_with_fp32"] >= 0.999 and summary["agreement_draws"] == 2000
    # Records of another precision are another experiment: the folder refuses them.
    assert _certify(tiny_models_dir, out, "--max-images", "2") == 2


def test_storage_that_refuses_a_write_mid_run_is_one_line_and_the_rerun_continues(
        tiny_models_dir, tmp_path):
    # A full disk, simulated without privileges by a limit on the size of any file the
    # process writes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG).
    import resource
    import subprocess
    import sys

    flags = ["certify", "--models", str(tiny_models_dir), "--sigma", "0.5", "--n", "20", "--n0",
             "5", "--max-images", "40", "--quiet"]
    whole = tmp_path / "whole"
    assert main([*flags, "--out", str(whole)]) == 0
    settings = (whole / "settings.json").stat().st_size
    limit = settings + (whole / "records.tsv").stat().st_size // 2

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "cut"
    # The limit binds the whole process, so the cut run is a process of its own.
    done = subprocess.run([sys.executable, "-m", "cadis", *flags, "--out", str(out)],
                          preexec_fn=limited, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "cadis: error: a write failed: File too large; finished work is kept: make room and "
        "run the same command again to continue"]
    kept = read_records(out / "records.tsv")
    assert 0 < len(kept) < 40 and not (out / "summary.json").exists()
    # The rerun, with room again, certifies only what is missing: the same records as a run
    # that never stopped, but for the seconds.
    assert main([*flags, "--out", str(out)]) == 0
    strip = [(r.idx, r.label, r.predict, r.radius) for r in read_records(out / "records.tsv")]
    assert strip == [(r.idx, r.label, r.predict, r.radius)
                     for r in read_records(whole / "records.tsv")]
