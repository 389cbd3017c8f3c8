"""The `cadis` command line. Thin: parse, validate at the edge, call the library.

Every user error (:class:`cadis.errors.CadisError`) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cadis.errors import EXIT_USAGE, CadisError


def _pretrain(args: argparse.Namespace) -> None:
    from cadis.pretrain import PretrainConfig, apply_overrides, pretrain

    config = apply_overrides(PretrainConfig(dataset=args.dataset, data_root=args.data_root,
                                            seed=args.seed), args.set)
    manifest = pretrain(config, Path(args.out), force=args.force, progress=not args.quiet)
    print(json.dumps({key: manifest[key] for key in (
        "clean_accuracy", "denoised_accuracy", "train_seconds", "parameters")}, indent=2))
    print(f"manifest: {Path(args.out) / 'manifest.json'}")


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
                          help="fashion-mnist (default), digits or cifar10")
    pretrain.add_argument("--data-root", help="where the dataset files are (else $CADIS_DATA)")
    pretrain.add_argument("--out", default="models/fashion-mnist", help="output directory")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a recipe value, e.g. classifier.epochs=5 or "
                               "denoiser.steps=1000 (repeatable)")
    pretrain.add_argument("--force", action="store_true", help="retrain even if outputs exist")
    pretrain.add_argument("--quiet", action="store_true", help="no progress bars")
    pretrain.set_defaults(handler=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except CadisError as error:
        print(f"cadis: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cadis: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
