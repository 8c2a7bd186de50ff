"""`jdpo generate` and `jdpo eval`: the commands that load a trained model to sample and score it.

Registered by `jdpo.cli` like every command (`add_<name>(subparsers)`); heavy modules are imported
inside the command that runs, so `jdpo --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys

MESH_FORM = "DATA,FSDP,TENSOR[,CONTEXT][,expert=N]"


def add_mesh_argument(p: argparse.ArgumentParser) -> None:
    """`--mesh DATA,FSDP,TENSOR[,CONTEXT][,expert=N]` of the commands that shard a loaded model
    (`mesh_arg`)."""
    p.add_argument(
        "--mesh",
        metavar=MESH_FORM,
        default=None,
        help="Shard over a device mesh, e.g. 1,-1,1 (rows over data x fsdp; default: one device); a fourth "
        "size splits rows of a multiple of 2 x CONTEXT tokens over that many devices; any axis may also be "
        "given by name, e.g. 2,1,1,expert=4 (an MoE model's experts over 4 devices, which also split the "
        "rows).",
    )


def mesh_arg(value: str | None, parser: argparse.ArgumentParser):
    """--mesh DATA,FSDP,TENSOR[,CONTEXT][,AXIS=N...] -> a jdpo.parallel.sharding mesh (None without the
    option). Sizes without a name are data, fsdp, tensor and context in that order; a named one (data,
    fsdp, tensor, expert, context) after them."""
    if value is None:
        return None
    from jdpo.parallel.sharding import MESH_AXES, make_mesh

    try:
        items = value.split(",")
        named = [item for item in items if "=" in item]
        plain = items[: len(items) - len(named)]
        if any("=" not in item for item in items[len(plain) :]):
            raise ValueError("named sizes (axis=N) come after the positional ones")
        if len(plain) not in (3, 4):
            raise ValueError(f"{len(plain)} positional sizes")
        sizes = dict(zip(("data", "fsdp", "tensor", "context"), map(int, plain), strict=False))
        for item in named:
            axis, size = (x.strip() for x in item.split("=", 1))
            if axis not in MESH_AXES:
                raise ValueError(f"no mesh axis {axis!r} (axes: {', '.join(MESH_AXES)})")
            if axis in sizes:
                raise ValueError(f"the {axis} axis is given twice")
            sizes[axis] = int(size)
        return make_mesh(**sizes)
    except ValueError as e:
        parser.error(f"--mesh {value}: {e} (expected {MESH_FORM}, e.g. 1,-1,1 or 1,-1,1,4 or 2,1,1,expert=4)")


def add_chat_template_kwargs_argument(p: argparse.ArgumentParser) -> None:
    """`--chat-template-kwargs` of the commands that render chat prompts (read by `chat_template_kwargs`)."""
    p.add_argument(
        "--chat-template-kwargs",
        metavar="MAPPING",
        default=None,
        help="Arguments of the chat template as JSON / YAML, e.g. '{\"enable_thinking\": false}' (default: "
        "the run's data.chat_template_kwargs when the model is a run's export, else none); a prompt row's "
        "own chat_template_kwargs field overrides them.",
    )


def chat_template_kwargs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """--chat-template-kwargs, else the run's data.chat_template_kwargs (the export's ../config.yaml)."""
    from jdpo.config import ConfigError, load_config, replace

    if args.chat_template_kwargs is None:
        from jdpo.commands.evaluate import run_config

        run = run_config(args.model)
        return dict(run.data.chat_template_kwargs) if run is not None else {}
    try:
        cfg = replace(load_config(), **{"data.chat_template_kwargs": args.chat_template_kwargs})
    except ConfigError as e:
        parser.error(f"--chat-template-kwargs: {str(e).split(': ', 2)[-1]}")
    return dict(cfg.data.chat_template_kwargs)


def add_generate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="Sample completions from a checkpoint (KV cache): stream one prompt, or a file to JSONL.",
        description=(
            "Generate with a Hugging Face checkpoint directory (e.g. a run's final/). --prompt streams the "
            'completion as it decodes; --prompts FILE (JSONL with a "prompt" text or messages field, or '
            "plain text with one prompt per line) writes one JSON line per prompt. Message prompts use the "
            "tokenizer's chat template with the generation prompt (a JSONL row's tools and "
            "chat_template_kwargs fields go to the template). Greedy unless --temperature > 0."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--model", metavar="DIR", required=True, help="Checkpoint directory (config.json, tokenizer)."
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="One prompt; its completion is streamed to stdout.")
    src.add_argument("--prompts", metavar="FILE", help="A file of prompts (JSONL or one per line).")
    p.add_argument("--chat", action="store_true", help="Send --prompt as a user message (chat template).")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="Tokens to generate at most (default: 128)."
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0).")
    p.add_argument(
        "--top-k", type=int, default=0, help="Sample from the k likeliest tokens (default: 0 = off)."
    )
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: 1.0 = off).")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0).")
    p.add_argument(
        "--batch-size", type=int, default=32, help="Prompts per batch with --prompts (default: 32)."
    )
    p.add_argument(
        "--out", metavar="FILE", default=None, help="JSONL output for --prompts (default: stdout)."
    )
    add_chat_template_kwargs_argument(p)
    add_mesh_argument(p)
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from jdpo.paths import check_writable

    if args.out:  # before the model loads
        check_writable(args.out, "--out", is_file=True)
    from jdpo.scoring.generate import Generator, SamplingParams, read_prompts

    try:
        sampling = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        prompts, options = read_prompts(args.prompts, with_options=True) if args.prompts else (None, None)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    template_kwargs = chat_template_kwargs(args, parser)
    gen = Generator.from_pretrained(args.model, mesh=mesh_arg(args.mesh, parser),
                                    chat_template_kwargs=template_kwargs)  # fmt: skip
    if prompts is None:
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        for piece in gen.stream(prompt, sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    rows = gen.generate(prompts, sampling, batch_size=args.batch_size, options=options)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
    try:
        for r in rows:
            out.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"],
                                  "finished": r["finished"]}, ensure_ascii=False) + "\n")  # fmt: skip
    finally:
        if args.out:
            out.close()
            print(f"wrote {len(rows)} completions to {args.out}", file=sys.stderr)
    return 0


def add_eval(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="Policy vs reference: held-out preference accuracy / margins, KL on samples, side by side.",
        description=(
            "Evaluate a trained policy against its reference on preference data: accuracy and margins of "
            "the implicit reward beta * (log p_policy - log p_ref) over every pair, sequence KL(policy || "
            "reference) on completions sampled from the policy, and greedy side-by-side generations for "
            "--num-samples prompts (with correctness and win rate where the answer is checkable, e.g. the "
            "demo's a+b= prompts). Writes metrics.json, samples.jsonl and samples.md to --out-dir."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--model", metavar="DIR", required=True, help="The policy checkpoint directory.")
    p.add_argument("--reference", metavar="DIR", required=True, help="The reference checkpoint directory.")
    p.add_argument("--data", metavar="SOURCE", required=True, help="Preference data (as data.eval takes it).")
    p.add_argument("--format", default="auto", help="Data format (default: auto).")
    p.add_argument("--num-samples", type=int, default=16, help="Prompts to sample and compare (default: 16).")
    p.add_argument("--out-dir", metavar="DIR", default="eval", help="Where results go (default: ./eval).")
    p.add_argument(
        "--beta", type=float, default=None, help="Reward scale (default: the run's dpo.beta, else 0.1)."
    )
    p.add_argument(
        "--loss-type",
        default=None,
        help="eval/loss of these loss type(s), comma-separated (default: the run's dpo.loss_type, else "
        "sigmoid); the run's other loss settings apply.",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="Tokens per sample at most (default: 64).")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="Prompt + completion cap (default: the run's data.max_length, else the config default).",
    )
    p.add_argument(
        "--max-prompt-length",
        type=int,
        default=None,
        help="Prompt cap (default: the run's data.max_prompt_length, else the config default).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the KL samples (default: 0).")
    p.add_argument(
        "--checker",
        choices=("arithmetic", "none"),
        default="arithmetic",
        help="Answer checker: arithmetic checks a+b= prompts, other prompts are not scored (default).",
    )
    add_chat_template_kwargs_argument(p)
    add_mesh_argument(p)
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from jdpo.paths import check_writable

    check_writable(args.out_dir, "--out-dir")  # before the models load
    from jdpo.commands import evaluate

    dpo = None
    if args.loss_type is not None:
        from jdpo.config import Config, ConfigError, replace

        run = evaluate.run_config(args.model) or Config()
        try:  # eval always has a reference model, whatever the run's own reference mode was
            dpo = replace(run, **{"dpo.loss_type": args.loss_type, "dpo.reference": "cached"}).dpo
        except ConfigError as e:
            parser.error(f"--loss-type: {e}")
    report = evaluate.evaluate(
        args.model,
        args.reference,
        args.data,
        dpo=dpo,
        beta=args.beta,
        num_samples=args.num_samples,
        out_dir=args.out_dir,
        format=args.format,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        answer_checker=evaluate.arithmetic_checker if args.checker == "arithmetic" else None,
        mesh=mesh_arg(args.mesh, parser),
        chat_template_kwargs=chat_template_kwargs(args, parser),
    )
    print(json.dumps(report["metrics"], indent=2))
    if report["summary"]:
        print(evaluate.format_summary(report["summary"]))
    for path in report["paths"].values():
        print(f"wrote {path}")
    return 0
