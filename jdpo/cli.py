"""The ``jdpo`` command.

    jdpo train --config experiments/gpu_single.yaml --model.path ~/qwen --dpo.beta 0.2
    jdpo demo --output-dir runs/demo
    jdpo plot runs/demo

Each subcommand is one ``_add_<name>(subparsers)`` function that registers its parser and sets
``func``; adding a command (eval, generate, export, bench, plan) means writing one such function and
listing it in ``COMMANDS``. Heavy modules (JAX, the trainer, matplotlib) are imported inside the
command that needs them, so ``jdpo --help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jdpo import config as C


def _format_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "(empty)"
    if isinstance(value, str):
        return repr(value) if value else "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _add_config_fields(parser: argparse.ArgumentParser) -> None:
    """One ``--section.field VALUE`` option per config field, grouped by section, with the field's
    type, default and help, generated from the dataclasses so the help cannot drift from the code.

    The options keep their raw strings (default: absent); ``load_config`` converts and validates
    them, so the YAML file and the command line share one set of rules and error messages."""
    for section, scls in C.sections().items():
        group = parser.add_argument_group(f"{section}", (scls.__doc__ or "").strip())
        for name, type_name, default, help_text in C.field_help():
            if not name.startswith(section + "."):
                continue
            metavar = "LIST" if type_name.startswith("list[") else type_name.upper()
            if type_name.startswith("{"):
                metavar = type_name
            elif type_name == "bool":
                metavar = "{true,false}"
            group.add_argument(
                f"--{name}",
                dest=name,
                metavar=metavar,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {_format_default(default)})".replace("%", "%%"),
            )


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        usage="jdpo train [-h] [--config FILE] [--print-config] [--section.field VALUE ...]",
        help="Train a policy with DPO from a YAML preset and --section.field overrides.",
        description=(
            "Train with DPO. The config is the dataclass defaults, then the YAML file given with "
            "--config (see experiments/), then the --section.field overrides below, later ones winning. "
            "Lists are comma-separated (--data.train a.jsonl,b.jsonl)."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE", help="YAML preset, e.g. experiments/cpu_small.yaml.")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="Print the resolved config as YAML and exit without training.",
    )
    _add_config_fields(p)
    p.set_defaults(func=_run_train)
    return p


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    overrides = [(k, v) for k, v in vars(args).items() if "." in k]
    overrides += getattr(args, "extra_overrides", [])
    try:
        cfg = C.load_config(args.config, overrides)
    except C.ConfigError as e:
        parser.error(str(e))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(C.to_dict(cfg), sort_keys=False), end="")
        return 0
    from jdpo import train

    train.run(cfg)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="Run the bundled CPU demo end to end (a tiny model learns a toy preference).",
        description="Train a tiny model on the bundled toy preference task on CPU, then plot its curves.",
    )
    p.add_argument("--output-dir", default="runs/demo", help="Where the run goes (default: runs/demo).")
    p.add_argument("--steps", type=int, default=None, help="DPO optimizer steps (default: the demo's own).")
    p.add_argument(
        "--sft-steps", type=int, default=None, help="Steps of the SFT stage that makes the reference model."
    )
    p.add_argument("--seed", type=int, default=None, help="Seed of the toy data and the model init.")
    p.add_argument("--no-plot", action="store_true", help="Do not write PNG curves after training.")
    p.set_defaults(func=_run_demo)
    return p


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from jdpo import demo

    kwargs: dict[str, Any] = {"output_dir": args.output_dir}
    # Only what was given: run_demo's own defaults stay the single source of the demo's settings.
    for name in ("steps", "sft_steps", "seed"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    demo.run_demo(**kwargs)
    if not args.no_plot:
        return _plot(args.output_dir, None)
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plot",
        help="Write PNG curves (loss, accuracy, margins, rewards, eval) from a run's metrics.jsonl.",
        description="Write PNG training curves from OUTPUT_DIR/metrics.jsonl to OUTPUT_DIR/plots/.",
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="A run's output directory.")
    p.add_argument("--out", default=None, help="Directory for the PNGs (default: OUTPUT_DIR/plots).")
    p.set_defaults(func=lambda args, parser: _plot(args.output_dir, args.out, parser))
    return p


def _plot(output_dir: str, out: str | None, parser: argparse.ArgumentParser | None = None) -> int:
    from pathlib import Path

    if not (Path(output_dir) / "metrics.jsonl").exists():
        msg = f"{output_dir}/metrics.jsonl does not exist (is {output_dir} a run's output_dir?)"
        if parser is not None:
            parser.error(msg)
        print(f"jdpo: {msg}", file=sys.stderr)
        return 1
    try:
        from jdpo.plot import plot_run
    except ImportError as e:  # matplotlib missing
        print(f"jdpo plot needs matplotlib: pip install matplotlib ({e})", file=sys.stderr)
        return 1
    for path in plot_run(output_dir, out):
        print(path)
    return 0


#: The subcommands, in the order ``jdpo --help`` lists them.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...] = (
    _add_train,
    _add_demo,
    _add_plot,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jdpo",
        description="Direct Preference Optimization for language models in JAX / Flax NNX.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        subparser = add(sub)
        # Each command gets its own parser back, so its errors print its own usage line.
        subparser.set_defaults(_parser=subparser)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jdpo")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jdpo`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    subparser = args._parser
    if extra:
        if args.command != "train":
            subparser.error(f"unrecognized arguments: {' '.join(extra)}")
        # Unknown --section.field options reach load_config, whose error names the closest field.
        try:
            args.extra_overrides = C.parse_overrides(extra)
        except C.ConfigError as e:
            subparser.error(str(e))
    return int(args.func(args, subparser) or 0)


if __name__ == "__main__":
    sys.exit(main())
