"""The `cadis` command line. Thin: parse, validate at the edge, call the library.

Every user error (:class:`cadis.errors.CadisError`) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cadis.errors import EXIT_USAGE, CadisError
from cadis.files import atomic_write_text, check_creatable_folder

if TYPE_CHECKING:
    from cadis.smoothing.paired import Certification


def _pretrain(args: argparse.Namespace) -> None:
    from cadis.pretrain import PretrainConfig, apply_overrides, pretrain

    config = apply_overrides(PretrainConfig(dataset=args.dataset, data_root=args.data_root,
                                            image_size=args.image_size, seed=args.seed), args.set)
    manifest = pretrain(config, Path(args.out), force=args.force, progress=not args.quiet)
    print(json.dumps({key: manifest[key] for key in (
        "clean_accuracy", "denoised_accuracy", "train_seconds", "parameters")}, indent=2))
    print(f"manifest: {Path(args.out) / 'manifest.json'}")


def _certify(args: argparse.Namespace) -> None:
    from cadis.certify_models import certify_models
    from cadis.models.sources import ModelSources
    from cadis.smoothing.records import RECORDS_FILENAME, format_table, read_records

    sources = ModelSources.resolve(args.models, args.classifier, args.denoiser, args.dataset,
                                   args.data_root, args.image_size)
    out = Path(args.out)
    summary = certify_models(sources, args.sigma, out, n=args.n, n0=args.n0, alpha=args.alpha,
                             skip=args.skip, max_images=args.max_images,
                             batch_size=args.batch_size, checkpoint=args.checkpoint,
                             radii=args.radii, seed=args.seed, device=args.device,
                             sequential=args.sequential, precision=args.precision,
                             compile=args.compile, draws_dir=args.draws_dir,
                             progress=not args.quiet)
    radii = [float(r) for r in summary["certified_accuracy"]]
    records = read_records(out / RECORDS_FILENAME)
    label = f"sigma={args.sigma:g}" + (", sequential" if args.sequential else "")
    print(format_table({label: records}, radii, fmt="markdown").rstrip("\n"))
    spent = (f"sequential, {summary['mean_draws']:.0f} draws an image on average (at most "
             f"n0 + n = {args.n0 + args.n}); its ACR is a grid ACR (acr_grid): the continuous "
             f"ACR needs fixed n (no --sequential)" if args.sequential else "fixed n")
    print(f"{summary['num_images']} images, n={args.n}, n0={args.n0}, alpha={args.alpha:g}, "
          f"{spent}; records, summary and plot in {out}")


def _analyze(args: argparse.Namespace) -> None:
    from cadis.smoothing.multiplicity import CORRECTIONS
    from cadis.smoothing.paired import (
        Certification,
        compare_certifications,
        format_comparison,
        plot_comparison,
        unchecked_models,
    )
    from cadis.smoothing.records import (
        RECORDS_FILENAME,
        default_radii,
        format_table,
        plot_certified_accuracy,
        read_records,
    )
    from cadis.validation import choice

    if args.correct is not None:
        choice(args.correct, "--correct", tuple(CORRECTIONS))
    paths = [Path(p) / RECORDS_FILENAME if Path(p).is_dir() else Path(p) for p in args.records]
    if args.labels and len(args.labels) != len(paths):
        raise CadisError(f"--labels needs one label per records file: {len(paths)} files, "
                         f"{len(args.labels)} labels")
    labels = args.labels or [str(p.parent if p.name == RECORDS_FILENAME else p) for p in paths]
    if len(set(labels)) != len(labels):
        raise CadisError(f"each records file needs its own label: {', '.join(labels)}")
    for path in paths:
        if not path.is_file():
            raise CadisError(f"records file {path} not found")
    paired = len(paths) > 1 and not args.unpaired
    if args.baseline is not None and not paired:
        raise CadisError("--baseline names the reference of a paired comparison: give two or "
                         "more records files, without --unpaired")
    if args.correct is not None and not paired:
        raise CadisError("--correct adjusts the p-values of a paired comparison: give two or "
                         "more records files, without --unpaired")
    radii = sorted(set(args.radii)) if args.radii else default_radii(args.scale)
    if not paired:
        record_sets = {label: read_records(path) for label, path in zip(labels, paths)}
        print(format_table(record_sets, radii, fmt=args.format).rstrip("\n"))
        if args.plot:
            plot_certified_accuracy(record_sets, Path(args.plot))
            print(f"plot: {args.plot}", file=sys.stderr)
        return
    if args.over_seeds:
        _analyze_seed_means(args, [Certification.read(label, path)
                                   for label, path in zip(labels, paths)], radii)
        return
    baseline = labels[0] if args.baseline is None else args.baseline
    if baseline not in labels:
        raise CadisError(f"--baseline {baseline!r} is none of the labels: {', '.join(labels)}")
    certifications = [Certification.read(label, path) for label, path in zip(labels, paths)]
    reference = certifications[labels.index(baseline)]
    others = [c for c in certifications if c is not reference]
    comparisons = compare_certifications(reference, others, radii)
    unchecked = unchecked_models(certifications)
    if unchecked:
        print(f"cadis: warning: the settings of {', '.join(unchecked)} name no sha256 of their "
              "models (records made before cadis recorded them, or models named rather than "
              "held as files): whether all were made on the same models cannot be checked",
              file=sys.stderr)
    print(format_comparison(reference, others, comparisons, radii, args.format,
                            args.correct).rstrip("\n"))
    if args.plot:
        plot_comparison(reference, others, comparisons, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr)


def _analyze_seed_means(args: argparse.Namespace, certifications: list[Certification],
                        radii: list[float]) -> None:
    """`cadis analyze --over-seeds`: every seed side by side, then each arm's mean over its
    seeds against the baseline arm's (:mod:`cadis.smoothing.seed_means`)."""
    from cadis.smoothing.paired import compare_certifications, plot_comparison
    from cadis.smoothing.records import format_table
    from cadis.smoothing.seed_means import compare_seed_means, format_seed_means, group_by_arm

    arms = group_by_arm([certification.label for certification in certifications])
    baseline = args.baseline or next(iter(arms))
    if baseline not in arms:
        raise CadisError(f"--baseline {baseline!r} is none of the arms: {', '.join(arms)}")
    if len(arms) < 2:
        raise CadisError(f"--over-seeds compares arms: the labels name one ({baseline}); label "
                         f"each seed ARM@SEED, e.g. ft_cadis@1 ft_cadis@2")
    reference = [certifications[position] for position in arms[baseline]]
    others = {arm: [certifications[position] for position in positions]
              for arm, positions in arms.items() if arm != baseline}
    comparisons = compare_seed_means(reference, others, radii)
    if args.format == "markdown":
        print("Certified accuracy of every seed:\n\n"
              + format_table({c.label: c.records for c in certifications}, radii) + "\n")
    print(format_seed_means(baseline, reference, comparisons, args.correct or "holm",
                            args.format).rstrip("\n"))
    if args.plot:
        seeds = [c for c in certifications if c not in reference]
        plot_comparison(reference[0], seeds,
                        compare_certifications(reference[0], seeds, radii), Path(args.plot))
        print(f"plot: {args.plot} (each seed against {reference[0].label})", file=sys.stderr)


def _train(args: argparse.Namespace) -> None:
    from cadis.certify_models import certify_trained
    from cadis.finetuning.config import from_mapping, load_sweep_file
    from cadis.finetuning.fit import fit, preflight
    from cadis.smoothing.records import RECORDS_FILENAME, format_table, read_records

    sweep = load_sweep_file(args.sweep)
    overrides = list(args.set) + ([f"workers={args.workers}"] if args.workers else [])
    config = from_mapping(sweep.get("base", {}), overrides)
    preflight(config)  # a bad model, data or LoRA target fails here, before training
    out = Path(args.out or Path("runs") / "train" / str(sweep.get("name", Path(args.sweep).stem)))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    checkpoint, certify_dir = None, out / "certify"
    if config.method != "none":
        checkpoint, history = fit(config, out, resume=args.resume, progress=not args.quiet)
        atomic_write_text(out / "history.json", json.dumps(history, indent=2) + "\n")
        print(f"checkpoint: {checkpoint}")
        # One folder per trained state: resuming to more epochs certifies anew beside it.
        certify_dir = out / f"certify_epoch_{int(history[-1]['epoch']):03d}"
    summary = certify_trained(config, certify_dir,
                              None if checkpoint is None else str(checkpoint),
                              progress=not args.quiet)
    radii = [float(r) for r in summary["certified_accuracy"]]
    records = read_records(certify_dir / RECORDS_FILENAME)
    print(format_table({config.method: records}, radii).rstrip("\n"))
    print(f"records, summary and plot in {certify_dir}")


def _sweep(args: argparse.Namespace) -> None:
    from cadis.sweeps.driver import run_sweep

    run_sweep(args.sweep, args.set, resume=args.resume, dry_run=args.dry_run,
              stop_after=args.stop_after, warm_start=args.warm_start)


def _compare(args: argparse.Namespace) -> None:
    from cadis.tracking.compare import run_compare

    if args.figures and not args.sweep:
        raise CadisError("--figures draws one sweep: name it with --sweep RUN_ID")
    run_compare(args)
    if args.figures:
        from cadis.sweeps.figures import draw_sweep

        paths, skipped = draw_sweep(args.tracking_uri, args.sweep, args.figures)
        for name, why in skipped.items():
            print(f"figures: {name}: {why}", file=sys.stderr)
        print(f"figures: {', '.join(path.name for path in paths)} in {args.figures}",
              file=sys.stderr)


def _radii(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"radii must be comma-separated numbers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadis", description="Certifiably robust classifiers by FT-CADIS denoised "
                                  "fine-tuning, with sweeps on Ray and tracking in MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser(
        "pretrain", help="train the off-the-shelf classifier and DDPM denoiser on clean data",
        description="Train a timm classifier and a diffusers DDPM on clean images, measure "
                    "clean and one-shot-denoised accuracy, and write them with a manifest.")
    pretrain.add_argument("--dataset", default="fashion-mnist",
                          help="fashion-mnist (default), digits, cifar10, or imagefolder (a "
                               "folder-per-class tree: --data-root and --image-size)")
    pretrain.add_argument("--data-root", help="where the dataset files are (else $CADIS_DATA); "
                                              "for imagefolder the tree")
    pretrain.add_argument("--image-size", type=int,
                          help="the size imagefolder images are resized to (square)")
    pretrain.add_argument("--out", default="models/fashion-mnist", help="output directory")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a recipe value, e.g. classifier.epochs=5 or "
                               "denoiser.steps=1000 (repeatable)")
    pretrain.add_argument("--force", action="store_true", help="retrain even if outputs exist")
    pretrain.add_argument("--quiet", action="store_true", help="no progress bars")
    pretrain.set_defaults(handler=_pretrain)

    certify = commands.add_parser(
        "certify", help="certify denoised smoothing on a test subset (Cohen et al. CERTIFY)",
        description="Certify classifier(denoiser(x + noise)) image by image: records.tsv "
                    "(resumable), summary.json and certified_accuracy.png in --out.")
    certify.add_argument("--models", help="a folder written by `cadis pretrain`")
    certify.add_argument("--classifier", help="timm name, hf-hub:ID or folder (overrides --models)")
    certify.add_argument("--denoiser", help="diffusers hub id or folder (overrides --models)")
    certify.add_argument("--dataset", help="dataset name (default: the models' own)")
    certify.add_argument("--data-root", help="where the dataset files are")
    certify.add_argument("--image-size", type=int, help="image size, for imagefolder data")
    certify.add_argument("--checkpoint", help="a fine-tuned classifier from `cadis train`")
    certify.add_argument("--sigma", type=float, required=True, help="noise level (in [0,1] units)")
    certify.add_argument("--n", type=int, default=10_000, help="draws for the bound (10000)")
    certify.add_argument("--n0", type=int, default=100, help="draws to pick the class (100)")
    certify.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    certify.add_argument("--skip", type=int, default=1, help="certify every skip-th test image")
    certify.add_argument("--max-images", type=int, help="at most this many images")
    certify.add_argument("--batch-size", type=int,
                         help="noise draws per forward (default: 100 on CPU, 1000 on CUDA)")
    certify.add_argument("--radii", type=_radii, help="radius grid of the table, e.g. 0,0.5,1")
    certify.add_argument("--sequential", action="store_true",
                         help="stop each image once every --radii radius is decided (default: "
                              "the grid radii n can reach; n: the most draws); sound at alpha "
                              "over all looks")
    certify.add_argument("--precision", default="auto",
                         help="auto (default: fp32 on the CPU, bf16 or fp16 on CUDA), fp32, bf16 "
                              "or fp16; anything but fp32 is checked against fp32 first")
    certify.add_argument("--compile", action="store_true",
                         help="torch.compile the models (pays on long runs; checked first)")
    certify.add_argument("--seed", type=int, default=0, help="seed of the noise")
    certify.add_argument("--draws-dir",
                         help="denoise these images' draws once into a store in this folder "
                              "(or find it there): each later classifier certified on them "
                              "runs alone, on the same draws")
    certify.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    certify.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    certify.add_argument("--quiet", action="store_true", help="no progress bar")
    certify.set_defaults(handler=_certify)

    train = commands.add_parser(
        "train", help="fine-tune with FT-CADIS (or a baseline) and certify the result",
        description="Run the base: section of a sweep file once, in this process or on Ray "
                    "Train workers, then certify the fine-tuned classifier.")
    train.add_argument("sweep", help="a sweep file, e.g. sweeps/default.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a base: value, e.g. lambda=4 or certify.n=500")
    train.add_argument("--workers", type=int, help="Ray Train workers (more than 1 uses Ray)")
    train.add_argument("--out", help="output folder (default runs/train/NAME)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    sweep = commands.add_parser(
        "sweep", help="search FT-CADIS settings with Ray Tune + Optuna + ASHA, tracked in MLflow",
        description="Run a sweep file: every trial fine-tunes on Ray Train workers, reports a "
                    "certified-accuracy proxy each epoch (ASHA stops weak trials) and is "
                    "certified on the validation hold-out (the rank stage, which the searcher "
                    "optimises); when the search ends the top_k are certified on the test set "
                    "(the final stage). Every trial is an MLflow child run.")
    sweep.add_argument("sweep", help="a sweep file, e.g. sweeps/default.yaml")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value: lambda=4 (a base key), base.lr=1e-3, "
                            "num_trials=8, scheduler.grace_period=2, "
                            "mlflow.tracking_uri=http://127.0.0.1:5000 (repeatable)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep in results_dir; finished trials "
                            "are not run again")
    sweep.add_argument("--stop-after", choices=("rank",),
                       help="stop once every trial is certified on validation; --resume later "
                            "certifies the top_k on the test set")
    sweep.add_argument("--warm-start", metavar="FROM",
                       help="start the searcher from the ranked trials of an earlier sweep with "
                            "the same searched keys (its results folder or parent run id)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the resolved search space, trials and resources; train "
                            "nothing")
    sweep.set_defaults(handler=_sweep)

    compare = commands.add_parser(
        "compare", help="trials of a sweep side by side from MLflow, with ablation plots",
        description="Read trial runs from MLflow: certified accuracy per radius, ACR and the "
                    "searched params per trial; with --by, one line per radius over a param.")
    source = compare.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="an MLflow experiment name (a sweep's name)")
    source.add_argument("--sweep", metavar="RUN_ID", help="a sweep's parent run id")
    compare.add_argument("--tracking-uri",
                         help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                              "sqlite:///runs/sweeps/mlflow.db)")
    compare.add_argument("--by", metavar="PARAM",
                         help="a param to put on the x axis, e.g. confidence_threshold")
    compare.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    compare.add_argument("--plot", metavar="FILE", help="write the ablation plot (PNG) here")
    compare.add_argument("--figures", metavar="DIR",
                         help="with --sweep: write the sweep's figures here (curves of the top "
                              "trials, parallel coordinates, importances, Pareto front, rungs)")
    compare.set_defaults(handler=_compare)

    analyze = commands.add_parser(
        "analyze", help="certified accuracy per radius of record files; two or more: paired "
                        "differences with McNemar p-values and bootstrap intervals",
        description="Tables and curves derived from records.tsv files (or folders holding one). "
                    "One file: its certified accuracy per radius and ACR. Two or more, "
                    "certified on the same images with the same sigma, n, n0 and alpha "
                    "(settings.json beside each): side by side, then each one's difference "
                    "from the reference per radius and in ACR, with McNemar's exact "
                    "two-sided p-value and a paired bootstrap 95% interval.")
    analyze.add_argument("records", nargs="+", help="records.tsv files or folders")
    analyze.add_argument("--labels", nargs="+", help="one label per records file")
    analyze.add_argument("--baseline", metavar="LABEL",
                         help="the reference the others are compared with (default: the first)")
    analyze.add_argument("--unpaired", action="store_true",
                         help="side by side only, no paired comparison (for records of other "
                              "images or settings)")
    analyze.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    analyze.add_argument("--radii", type=_radii, help="radius grid, e.g. 0,0.25,0.5")
    analyze.add_argument("--scale", choices=("cifar", "imagenet"), default="cifar",
                         help="default radius grid: 0.25 steps (cifar) or 0.5 (imagenet)")
    analyze.add_argument("--plot", help="write the curves (paired: and the differences with "
                                        "their intervals) to this PNG")
    analyze.add_argument("--correct", metavar="holm|bh",
                         help="adjust every p-value of the run (all radii x all compared sets: "
                              "one family) by Holm's step-down (family-wise error) or "
                              "Benjamini-Hochberg (false discovery rate), shown beside the raw "
                              "p (default: none)")
    analyze.add_argument("--over-seeds", action="store_true",
                         help="label each training seed ARM@SEED (ft_cadis@1 ft_cadis@2 ...): "
                              "every seed side by side, then each arm's mean over its seeds "
                              "against the --baseline arm's, with a paired sign-flip p per "
                              "radius adjusted over every arm and radius (--correct, default "
                              "holm)")
    analyze.set_defaults(handler=_analyze)
    return parser


# MLflow's telemetry client sets and unsets a variable from its own thread while requests
# iterates os.environ (a KeyError that failed a sweep's first MLflow call), and an offline
# cluster should not phone home anyway. Set before MLflow loads; Ray workers started from
# this process inherit it.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true"}


# Storage refusing a write mid-run (disk or quota full, a file-size limit, a folder made
# read-only): one line, not a traceback. What was written stays whole: results go through
# atomic writes, and a records line cut short is ignored and cut when the run resumes.
STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES})


def main(argv: list[str] | None = None) -> int:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        # An --out (or --draws-dir) that cannot be made fails before any work.
        for flag in ("out", "draws_dir"):
            if getattr(args, flag, None):
                check_creatable_folder(getattr(args, flag), f"--{flag.replace('_', '-')}")
        args.handler(args)
    except CadisError as error:
        print(f"cadis: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        if error.errno not in STORAGE_ERRORS:
            raise
        where = f" {error.filename}" if error.filename else ""
        print(f"cadis: error: a write{where} failed: {error.strerror}; finished work is kept: "
              "make room and run the same command again to continue", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cadis: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
