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
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from jdpo import config as C
from jdpo.commands import lean_process
from jdpo.commands.cli_inference import add_eval, add_generate
from jdpo.errors import EXIT_UPLOAD_FAILED, EXIT_USER_ERROR, HubUploadError, NonFiniteLossError, UserError


def format_default(value: Any) -> str:
    """A config default as `--help` shows it: tuples comma-joined, strings quoted, booleans lower-case,
    an empty one as "(empty)"."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "(empty)"
    if isinstance(value, str):
        return repr(value) if value else "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, without breaking a long word: a comma-joined default (e.g. lora.targets's seven
    module names) stays one token that can be copied back as a value."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


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
                help=f"{help_text} (default: {format_default(default)})".replace("%", "%%"),
            )


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        usage="jdpo train [-h] [--config FILE] [--print-config] [--section.field VALUE ...]",
        formatter_class=_HelpFormatter,
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
    from jdpo.parallel import distributed

    distributed.add_arguments(p)
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
    _check_run_outputs(cfg)
    if not cfg.dpo.online:  # online DPO's reward function may use transformers' PyTorch models
        lean_process.keep_torch_out()
    # Before any JAX computation: joins jax.distributed when a cluster is detected, else a no-op.
    from jdpo.parallel import distributed

    info = distributed.initialize_from_args(args)
    if info.process_count > 1 and distributed.is_main_process():
        print(f"[jdpo] {info}")
    import jax

    from jdpo.commands.plan import check_run_size

    check_run_size(cfg, num_devices=jax.device_count())  # sequences and memory, before the model loads
    from jdpo.train import trainer as train

    main_thread = threading.current_thread() is threading.main_thread()  # only it can catch signals
    previous = signal.signal(signal.SIGTERM, _sigterm_outside_the_loop) if main_thread else None
    try:
        result = train.run(cfg)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if result.stop_reason == "sigterm":
        if distributed.is_main_process():
            print(f"[jdpo] SIGTERM: checkpointed at step {result.step} in {result.checkpoint_dir}; the same "
                  f"command resumes it (exit status {EXIT_PREEMPTED})", flush=True)  # fmt: skip
        return EXIT_PREEMPTED
    return 0


def _sigterm_outside_the_loop(signum, frame) -> None:
    """SIGTERM while the run loads, prepares or exports (the training loop's own handler checkpoints and
    returns 143; `jdpo.train.guards.Preemption`): say so and exit with the same status, instead of dying
    silently."""
    print(f"jdpo train: SIGTERM outside the training loop (while loading, preparing or exporting): stopped "
          "with no new checkpoint; the same command starts the run, or resumes it from its last checkpoint "
          f"(exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)  # fmt: skip
    raise SystemExit(EXIT_PREEMPTED)


def _check_run_outputs(cfg) -> None:
    """Every location a run writes, checked before anything loads (`jdpo.paths.check_writable`): the
    output directory, and the reference cache and the compilation cache where they are set apart from
    it (by default they sit beside it)."""
    from jdpo.paths import check_writable

    check_writable(cfg.train.output_dir, "train.output_dir")
    if cfg.dpo.cache_dir:
        check_writable(cfg.dpo.cache_dir, "dpo.cache_dir")
    if cfg.train.compile_cache not in ("", "none"):
        check_writable(cfg.train.compile_cache, "train.compile_cache")


def _add_demo(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jdpo.commands.demo_recipes import RECIPES  # without the demo's imports (JAX, the trainer)

    p = sub.add_parser(
        "demo",
        help="Run the bundled CPU demo end to end (a tiny model learns a toy preference).",
        description="On CPU in a few minutes: a tiny model learns two-digit sums, picks up a careless "
        "teacher's habit of forgetting the carry (SFT: the reference), and DPO trains the habit away. Prints "
        "held-out preference accuracy / margins and greedy answers of the reference and the policy side by "
        "side; writes metrics, plots and <output-dir>/generations/samples.md. The DPO stage's settings are "
        "experiments/demo.yaml.",
    )
    p.add_argument("--output-dir", default="runs/demo", help="Where the run goes (default: runs/demo).")
    p.add_argument("--steps", type=int, default=None, help="DPO optimizer steps (default: the preset's).")
    p.add_argument(
        "--pretrain-steps", type=int, default=None, help="Steps of the SFT stage on right answers (0: none)."
    )
    p.add_argument(
        "--sft-steps", type=int, default=None, help="Steps of the SFT stage that makes the reference model."
    )
    p.add_argument("--seed", type=int, default=None, help="Seed of the toy data and the model init.")
    p.add_argument(
        "--loss-type",
        default=None,
        help="The preference stage's dpo.loss_type (default: the preset's sigmoid); kto, bco or "
        "apo_zero_unpaired train on the pairs split into rated answers (right: desirable, slip: not).",
    )
    p.add_argument(
        "--lora",
        type=int,
        default=None,
        metavar="RANK",
        dest="lora_rank",
        help="Train the preference stage as LoRA adapters of this rank on the frozen SFT model (the "
        "reference); its final/ is then a PEFT adapter directory.",
    )
    p.add_argument(
        "--recipe",
        default=None,
        choices=RECIPES,
        help="How the preference stage learns: offline (default: the fixed pairs, right sum vs the slip), "
        "iterative (the same pairs in 6 rounds, the policy the next round's reference) or online (each "
        "step samples 4 answers per prompt from the policy, reward 1 if right, trains right vs wrong). "
        "Every recipe writes <output-dir>/summary.json.",
    )
    p.add_argument("--no-plot", action="store_true", help="Do not write PNG curves after training.")
    p.set_defaults(func=_run_demo)
    return p


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from jdpo import demo

    kwargs: dict[str, Any] = {"output_dir": args.output_dir, "plot": not args.no_plot}
    # Only what was given: run_demo's own defaults stay the single source of the demo's settings.
    for name in ("steps", "pretrain_steps", "sft_steps", "seed", "loss_type", "lora_rank", "recipe"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    demo.run_demo(**kwargs)
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plot",
        help="Write PNG curves (loss, accuracy, margins, rewards, eval) from a run's metrics.jsonl.",
        description="Write PNG training curves from OUTPUT_DIR/metrics.jsonl to OUTPUT_DIR/plots/.",
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="A run's output directory (local or gs://).")
    p.add_argument("--out", default=None, help="Directory for the PNGs (default: OUTPUT_DIR/plots).")
    p.set_defaults(func=lambda args, parser: _plot(args.output_dir, args.out, parser))
    return p


def _plot(output_dir: str, out: str | None, parser: argparse.ArgumentParser | None = None) -> int:
    from jdpo.paths import as_path, check_writable

    if not (as_path(output_dir) / "metrics.jsonl").exists():  # a local directory or a gs:// URL
        msg = f"{output_dir}/metrics.jsonl does not exist (is {output_dir} a run's output_dir?)"
        if parser is not None:
            parser.error(msg)
        print(f"jdpo: {msg}", file=sys.stderr)
        return 1
    check_writable(out if out is not None else f"{output_dir}/plots", "--out" if out else "plot directory")
    try:
        from jdpo.report.plot import plot_run
    except ImportError as e:  # matplotlib missing
        print(f"jdpo plot needs matplotlib: pip install matplotlib ({e})", file=sys.stderr)
        return 1
    for path in plot_run(output_dir, out):
        print(path)
    return 0


def _load_cfg(args: argparse.Namespace, parser: argparse.ArgumentParser, extra: list[tuple[str, str]]):
    """The config of --config FILE plus the --section.field overrides (and `extra` ones)."""
    overrides = [(k, v) for k, v in vars(args).items() if "." in k] + extra
    try:
        return C.load_config(args.config, overrides)
    except C.ConfigError as e:
        parser.error(str(e))


def _add_plan(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        usage="jdpo plan [-h] (--config FILE | --hf-config JSON) [--device-memory SIZE] "
        "[--section.field VALUE ...]",
        help="Expected memory per device of a run (parameters, gradients, optimizer, activations).",
        description=(
            "Print the expected memory per device of training a config, and whether it fits, without "
            "allocating anything: shapes from jax.eval_shape of the model of model.path (or of a bare HF "
            "config.json given with --hf-config), sharded by the mesh."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE", help="YAML preset, e.g. experiments/gpu_single.yaml.")
    p.add_argument("--hf-config", metavar="JSON", help="A HF config.json (instead of model.path's).")
    p.add_argument(
        "--device-memory",
        metavar="SIZE|NAME",
        default=None,
        help="Memory of one device: a size (80GiB, 16GB) or h100, h200, a100-40g, a100-80g, v5e, v5p, v4, "
        "cpu (default: the detected device's).",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="Devices the run will use (default: this host's JAX devices).",
    )
    p.add_argument("--num-pairs", type=int, default=None, help="Train pairs, for the reference-cache size.")
    p.add_argument("--json", metavar="FILE", default=None, help="Also write the plan as JSON here.")
    _add_config_fields(p)
    p.set_defaults(func=_run_plan)
    return p


def _run_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json
    from pathlib import Path

    from jdpo.commands import plan

    cfg = _load_cfg(args, parser, [])
    source = args.hf_config or cfg.model.path
    if not source:
        parser.error("give --hf-config config.json or model.path (in --config or --model.path)")
    try:
        model_config = plan.read_model_config(source)
        device, device_bytes = plan.device_memory(args.device_memory)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if args.devices is None:
        import jax

        num_devices = jax.device_count()
    else:
        num_devices = args.devices
    num_pairs = (  # an online run's data.train may be prompts only: it has no pairs to cache
        args.num_pairs
        if args.num_pairs is not None or cfg.dpo.online
        else plan.count_pairs(cfg.data.train, cfg.data.format)
    )
    try:
        result = plan.plan_memory(
            model_config,
            cfg,
            num_devices=num_devices,
            num_pairs=num_pairs,
            on_cpu=device.startswith("cpu"),
            backend=plan.target_backend(device),
        )
    except ValueError as e:
        parser.error(str(e))
    print(plan.format_plan(result, device=device, device_bytes=device_bytes))
    backend = plan.target_backend(device)
    longest = plan.longest_row(
        model_config, cfg, num_devices=num_devices, device_bytes=device_bytes, backend=backend
    )
    print(f"longest row that fits: {longest:,} tokens (these settings, mesh.context={cfg.mesh.context})")
    if args.json:
        out = {**result.to_dict(), "device": device, "device_bytes": device_bytes,
               "fits": plan.fits(result, device_bytes), "longest_row": longest}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if plan.fits(result, device_bytes) else 2


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        usage="jdpo bench [-h] (--config FILE | --model DIR --data SRC) [--steps N] [--json FILE] "
        "[--section.field VALUE ...]",
        help="Measure reference pass, compile time, pairs/s, tokens/s, MFU, padding and peak memory.",
        description=(
            "Benchmark training a config on this machine: the reference pass, compile time, then "
            "steady-state steps (after warm-up, each blocked until ready): pairs/s, non-pad tokens/s, "
            "MFU on model FLOPs (against the measured matmul peak on CPU, the published peak on "
            "GPU/TPU), padding and peak memory. Prints a table and writes JSON. Nothing is saved."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE", help="YAML preset, e.g. experiments/cpu_small.yaml.")
    p.add_argument("--model", metavar="DIR", default=None, help="Shorthand for --model.path DIR.")
    p.add_argument("--data", metavar="SRC", default=None, help="Shorthand for --data.train SRC.")
    p.add_argument("--steps", type=int, default=10, help="Timed steps (default: 10).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps after compiling (default: 2).")
    p.add_argument("--json", metavar="FILE", default="bench.json", help="Result file (default: bench.json).")
    _add_config_fields(p)
    p.set_defaults(func=_run_bench)
    return p


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    extra = [("model.path", args.model)] if args.model else []
    extra += [("data.train", args.data)] if args.data else []
    cfg = _load_cfg(args, parser, extra)
    if not cfg.model.path or not cfg.data.train:
        parser.error("give a model (--model DIR or model.path) and data (--data SRC or data.train)")
    from jdpo.commands import bench

    result = bench.run_bench(cfg, steps=args.steps, warmup=args.warmup, out_json=args.json)
    print(bench.format_bench(result))
    print(f"wrote {args.json}")
    return 0


#: The subcommands, in the order ``jdpo --help`` lists them.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...] = (
    _add_train,
    _add_demo,
    _add_plot,
    _add_plan,
    _add_bench,
    add_generate,
    add_eval,
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
        subparser.add_argument(
            "--debug",
            action="store_true",
            help="Show the Python traceback of an input error (also with JDPO_DEBUG=1); without it such "
            f"an error is one message and exit status {EXIT_USER_ERROR} (a diverged run: {EXIT_DIVERGED}; a "
            f"failed Hub upload after the export: {EXIT_UPLOAD_FAILED}).",
        )
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jdpo")
    except PackageNotFoundError:
        return "unknown"


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """`--section.field -1e-3` -> `--section.field=-1e-3`: argparse reads a value that starts with '-'
    as an option and would say "expected one argument" instead of letting the config validator name
    the field and its range."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if (arg.startswith("--") and "." in arg and "=" not in arg and i + 1 < len(argv)
                and _NEGATIVE_NUMBER.match(argv[i + 1])):  # fmt: skip
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: a preempted run checkpointed and stopped; rerun to continue
EXIT_DIVERGED = (
    3  # the loss became NaN or the run blew up (jdpo.train.guards); the last good checkpoint is kept
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jdpo`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    subparser = args._parser
    if extra:
        if args.command != "train":
            subparser.error(f"unrecognized arguments: {' '.join(extra)}")
        # Unknown --section.field options reach load_config, whose error names the closest field.
        try:
            args.extra_overrides = C.parse_overrides(extra)
        except C.ConfigError as e:
            subparser.error(str(e))
    try:
        return int(args.func(args, subparser) or 0)
    except (UserError, NonFiniteLossError) as e:
        if args.debug or os.environ.get("JDPO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        print(f"jdpo {args.command}: error: {e}", file=sys.stderr)
        # A run that diverged (NaN, a spike, runaway weights) is told apart from bad input: the input was
        # fine, the optimisation settings were not; its last good checkpoint is named in the message.
        return EXIT_DIVERGED if isinstance(e, NonFiniteLossError) else EXIT_USER_ERROR
    except HubUploadError as e:  # the run is done and exported; only the upload failed
        print(f"jdpo {args.command}: error: {e} (exit status {EXIT_UPLOAD_FAILED})", file=sys.stderr)
        return EXIT_UPLOAD_FAILED


def entry() -> None:
    """The ``jdpo`` console script: ``main``, then the process ends without the interpreter's teardown.

    When a command returns, everything it writes is closed (checkpoints committed, metrics, event files
    and exports written). Python's module teardown after that frees XLA's, orbax's and (when installed)
    torch's objects one by one, which took 1.2-1.4 s of every ``jdpo train`` process on 2 CPU cores, for
    nothing a user needs. The exit handlers still run first (logging's flush, ``jax.distributed``'s
    shutdown on a multi-host run); an exception propagates as usual. ``main`` itself, which tests and
    scripts call in-process, returns normally, and ``python -m jdpo.cli`` exits the ordinary way (so a
    profiler or debugger that runs the module gets to write its report)."""
    status = main()
    import atexit

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; elsewhere a normal exit
    if run_exit_handlers is None:
        sys.exit(status)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
