"""`mcjax <command>`: prep, train, bench and config on a config; generate, infer and eval on a trained run.

prep, train, bench and config take `--config FILE`; generate, infer and eval take `--run RUN` (a run
name under artifacts/runs/ or a run directory). All take trailing `a.b=value`
overrides. Errors a user can cause are printed as one line (`mcjax: error: ...`) with
exit code 2, never a traceback; a training run stopped by a non-finite loss, gradient or
state (`NonFiniteError`) is printed the same way and exits with code 3.
"""

from __future__ import annotations

import argparse
import sys

from mcjax.errors import NonFiniteError, UserError

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


def _load(args):
    from mcjax.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prep(args) -> None:
    cfg = _load(args)
    from mcjax.data.prep import prepare

    prepare(cfg, force=args.force)


def cmd_train(args) -> None:
    cfg = _load(args)  # config errors first, before the heavy imports
    from mcjax.train.loop import train

    train(cfg, resume=args.resume)


def cmd_config(args) -> None:
    cfg = _load(args)
    from mcjax.config_doc import commented_yaml

    sys.stdout.write(commented_yaml(cfg, args.overrides))


def cmd_bench(args) -> None:
    cfg = _load(args)
    t, mc = cfg.dataset.context_tokens, cfg.megacontext
    wc = args.wc_length or mc.train_wc_length
    if not 0 < wc <= 1 or wc * t < mc.recent_tokens + cfg.dataset.block_size:
        raise UserError(
            f"--wc-length {wc}: must be in (0, 1] with {wc} × {t} ≥ megacontext.recent_tokens "
            f"({mc.recent_tokens}) + one block ({cfg.dataset.block_size})"
        )
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be ≥ 1")
    from mcjax.bench import main as bench_main

    bench_main(cfg, batch=args.batch, wc_length=wc, steps=args.steps, json_path=args.json)


def cmd_generate(args) -> None:
    from mcjax.runtime.cli import generate

    generate(args)


def cmd_infer(args) -> None:
    from mcjax.runtime.cli import infer

    infer(args)


def cmd_eval(args) -> None:
    from mcjax.eval.cli import main as eval_main

    eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        p.set_defaults(fn=fn)
        return p

    p = command("prep", cmd_prep, "tokenize the dataset's sources into Arrow train/val files")
    p.add_argument("--force", action="store_true", help="rebuild even if the files are up to date")
    p = command("train", cmd_train, "train (prepares the data first if needed)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    command("config", cmd_config, "print the resolved config as YAML, every key with its comment (docs/config.md)")
    p = command("bench", cmd_bench, "time the plain GPT step and the MegaContext step side by side")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--wc-length", type=float, default=0.0, help="variant length × context_tokens (default megacontext.train_wc_length)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per mode after 3 warm-up steps, in runs of 4 (default 12)")
    p.add_argument("--json", default="", help="also write the results here")

    def run_command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--run", required=True, help="a run name under artifacts/runs/, or a run directory")
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
        p.add_argument("--engine", default="auto", help="mc (MegaContext) or plain (sliding-window GPT); default: the run's kind")
        p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
        p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens, 0 = all (default 50)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides of the run's config (runtime.*, allocator.*)")
        p.set_defaults(fn=fn)
        return p

    p = run_command("generate", cmd_generate, "continue a prompt with a trained run, streaming the text to stdout")
    p.add_argument("--prompt", default=None, help="the prompt text")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p = run_command("infer", cmd_infer, "stream documents through ingest and refocus, writing runtime telemetry")
    p.add_argument("--input", required=True, action="append", help="a file or glob of documents (.txt, .py, ...), one stream each; repeat for more")
    p.add_argument("--generate", type=int, default=0, help="after each document, generate this many tokens (default 0)")
    p.add_argument("--batch", type=int, default=1, help="documents streamed side by side (default 1)")

    p = sub.add_parser("eval", help="evaluation suites and the POC acceptance report of a trained run",
                       description="evaluation suites and the POC acceptance report of a trained run "
                                   "(sizes: eval.* overrides; outputs under <out>/eval/<run>/)")
    p.add_argument("--run", required=True, help="a run name under artifacts/runs/, or a run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--suite", action="append", default=None, metavar="SUITE",
                   help="delta, focus, retrieval, boundary, stability or all (default; repeat or comma-separate)")
    p.add_argument("--data", action="append", default=None, metavar="NAME=GLOB",
                   help="evaluate on these files instead of the run's held-out documents (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides of the run's config (eval.*, runtime.*, allocator.*)")
    p.set_defaults(fn=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"mcjax: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteError) else 2
    except KeyboardInterrupt:
        print("mcjax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
