"""Entry points of `repbend eval`, `repbend logit-lens` and `repbend rep-shift` (dispatched by `repbend.cli`).

    repbend eval --model.path DIR [--adapter DIR] [--harmbench FILE] [--xstest FILE]
                 [--attacks direct,prefill,input_embed,transfer] [--transfer FILE]
                 [--judges keywords,harmbench=DIR,wildguard=DIR] [--gen.max_new_tokens N] [--gen.batch_size N]
                 --output DIR
    repbend eval --compare RUN_A RUN_B [--output DIR]
    repbend logit-lens --model.path DIR [--adapter DIR] --prompt TEXT [--response-prefix TEXT] --output FILE.png
    repbend rep-shift --model.path DIR --adapter DIR --safe FILE --unsafe FILE --output DIR

The model options are spelled as in `repbend train`: --model.path, --model.dtype, --model.device (the older
--dtype / --device still work, unlisted). Errors the user can fix are one line: argparse's own (exit 2),
`UsageError` for a bad option value, `repbend.data.errors.DataError` for a file, row or field; every input is
checked before a model is loaded (see `inputs.py`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


class UsageError(ValueError):
    """A bad option value of `repbend eval`, `logit-lens` or `rep-shift`, in one line naming the option; the
    `repbend` command prints it as `repbend: error: <message>` and exits with status 2."""


def _model_args(p: argparse.ArgumentParser, *, required: bool = True, adapter_required: bool = False) -> None:
    p.add_argument("--model.path", dest="model_path", required=required, metavar="DIR",
                   help="HF model directory (or hub id org/name)")
    p.add_argument("--adapter", required=adapter_required, metavar="DIR",
                   help="PEFT adapter directory (applied unmerged)")
    p.add_argument("--model.dtype", dest="dtype", default="auto", help="auto (bf16 GPU / fp32 CPU), bf16, fp16, fp32")
    p.add_argument("--dtype", dest="dtype", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # older spelling
    p.add_argument("--model.device", dest="device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--device", dest="device", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # older spelling


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_judges(text: str) -> list[tuple[str, str | None]]:
    """"keywords,harmbench=DIR,wildguard=DIR" -> [("keywords", None), ("harmbench", DIR), ...]. UsageError for an
    unknown judge, a classifier without its directory, a directory given to `keywords`, or a judge named twice."""
    from .judges import JUDGES

    judges: list[tuple[str, str | None]] = []
    for part in _list(text):
        name, eq, path = (x.strip() for x in part.partition("="))
        if name not in JUDGES:
            raise UsageError(f"--judges: unknown judge {name!r}; known: keywords, harmbench=DIR, wildguard=DIR")
        if name == "keywords" and eq:
            raise UsageError(f"--judges {part}: the keywords judge takes no directory")
        if name != "keywords" and not path:
            raise UsageError(f"--judges: {name} needs its classifier: {name}=DIR")
        if any(name == seen for seen, _ in judges):
            raise UsageError(f"--judges: {name} is given twice")
        judges.append((name, path or None))
    if not judges:
        raise UsageError("--judges: no judge given")
    return judges


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repbend eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Attack success rate on HarmBench and over-refusal on XSTest, for a model with an optional PEFT "
                    "adapter: writes OUTPUT/generations.jsonl (resumable), summary.json and summary.md. "
                    "--compare RUN_A RUN_B puts two finished runs side by side.")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="put two finished runs (directories with summary.json) side by side; needs no model")
    _model_args(p, required=False)
    p.add_argument("--harmbench", metavar="FILE",
                   help="HarmBench behaviours: JSON {\"data\": [...]} or the HarmBench CSV")
    p.add_argument("--harmbench-targets", dest="harmbench_targets", metavar="FILE",
                   help="JSON BehaviorID -> target string (the HarmBench CSV has no targets)")
    p.add_argument("--xstest", metavar="FILE", help="XSTest prompts CSV (id, type, prompt, ...)")
    p.add_argument("--attacks", default="direct", help="comma list of direct, prefill, input_embed, transfer")
    p.add_argument("--transfer", metavar="FILE",
                   help="transfer attack prompts, JSON or JSONL (see repbend/eval/benchmarks.py)")
    p.add_argument("--judges", default="keywords", help="comma list: keywords, harmbench=DIR, wildguard=DIR")
    p.add_argument("--gen.max_new_tokens", dest="max_new_tokens", type=int, default=512, metavar="N")
    p.add_argument("--gen.batch_size", dest="batch_size", type=int, default=16, metavar="N")
    p.add_argument("--input_embed.tokens", dest="embed_tokens", type=int, default=20, help="soft prompt length")
    p.add_argument("--input_embed.steps", dest="embed_steps", type=int, default=500, help="Adam steps (budget)")
    p.add_argument("--input_embed.lr", dest="embed_lr", type=float, default=1e-3)
    p.add_argument("--input_embed.stop_loss", dest="embed_stop_loss", type=float, default=0.05,
                   help="stop once every soft prompt's target loss is below this")
    p.add_argument("--input_embed.batch_size", dest="embed_batch_size", type=int, default=8)
    p.add_argument("--judge.batch_size", dest="judge_batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first N items of each benchmark (smoke runs)")
    p.add_argument("--output", metavar="DIR", help="run directory: generations.jsonl, summary.json, summary.md")
    return p


def main_eval(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    if args.compare:
        return _compare(*args.compare, output=args.output)
    if not args.model_path or not args.output:
        eval_parser().error("--model.path and --output are required (or --compare RUN_A RUN_B)")
    from .run import EvalConfig, run_eval

    cfg = EvalConfig(
        model_path=args.model_path, output=args.output, adapter=args.adapter, harmbench=args.harmbench,
        harmbench_targets=args.harmbench_targets, xstest=args.xstest, attacks=_list(args.attacks),
        transfer=args.transfer, judges=parse_judges(args.judges), max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, limit=args.limit, dtype=args.dtype, device=args.device,
        embed_tokens=args.embed_tokens, embed_steps=args.embed_steps, embed_lr=args.embed_lr,
        embed_stop_loss=args.embed_stop_loss, embed_batch_size=args.embed_batch_size,
        judge_batch_size=args.judge_batch_size)
    run_eval(cfg)  # checks every input (inputs.py) before it loads the model
    return 0


def _compare(run_a: str, run_b: str, output: str | None = None) -> int:
    from .summary import compare, compare_markdown, load_summary

    if output and Path(output).exists() and not Path(output).is_dir():
        raise UsageError(f"--output {output}: exists and is not a directory")
    rows = compare(load_summary(run_a), load_summary(run_b))
    table = compare_markdown(rows, Path(run_a).name or "A", Path(run_b).name or "B")
    print(table)
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps({"a": run_a, "b": run_b, "rows": rows}, indent=2) + "\n",
                                          encoding="utf-8")
        (out / "compare.md").write_text(table, encoding="utf-8")
    return 0


def main_logit_lens(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="repbend logit-lens",
                                description="layers x tokens heatmap of the logit lens, base vs tuned")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--response-prefix", dest="response_prefix", default="",
                   help="text written after the generation prompt (the start of a response)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=32, help="show the last N tokens")
    p.add_argument("--output", required=True, help="PNG file")
    args = p.parse_args(argv)
    from .inputs import check_positive

    if not args.prompt.strip():
        raise UsageError("--prompt: empty")
    check_positive(args.max_tokens, "--max-tokens")
    if Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: is a directory (expected a PNG file name)")
    _check_model(args)
    from .lens import lens_views, plot_lens
    from .run import load_model

    model, tokenizer = load_model(args.model_path, args.adapter, args.dtype, args.device)
    views = lens_views(model, tokenizer, args.prompt, args.response_prefix, args.max_tokens)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    plot_lens(views, args.output, title=f"logit lens: {args.prompt[:60]}")
    print(f"wrote {args.output}")
    return 0


def main_rep_shift(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="repbend rep-shift",
                                description="per-layer L2 distance and cosine between base and tuned representations")
    _model_args(p, adapter_required=True)
    p.add_argument("--safe", required=True, help="safe prompts: JSONL with \"prompt\" or one prompt a line")
    p.add_argument("--unsafe", required=True, help="unsafe prompts, same formats")
    p.add_argument("--positions", choices=("last", "all"), default="last",
                   help="last request token, or all request tokens")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--output", required=True, help="directory: rep_shift.csv, rep_shift.png")
    args = p.parse_args(argv)
    from .inputs import check_positive

    check_positive(args.batch_size, "--batch-size")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: exists and is not a directory")
    _check_model(args)
    from .benchmarks import read_prompts
    from .rep_shift import plot_shift, representation_shift, write_csv
    from .run import load_model

    sets = {"safe": read_prompts(args.safe), "unsafe": read_prompts(args.unsafe)}
    model, tokenizer = load_model(args.model_path, args.adapter, args.dtype, args.device)
    shifts = {name: representation_shift(model, tokenizer, prompts, args.positions, args.batch_size)
              for name, prompts in sets.items()}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "rep_shift.csv", shifts)
    plot_shift(out / "rep_shift.png", shifts, title=f"representation shift ({args.positions} request token"
                                                      f"{'s' if args.positions == 'all' else ''})")
    print(f"wrote {out / 'rep_shift.csv'} and {out / 'rep_shift.png'}")
    return 0


def _check_model(args) -> None:
    """The model options of logit-lens / rep-shift, before anything loads."""
    from .inputs import check_device, check_dtype, check_model_location

    check_dtype(args.dtype)
    check_device(args.device)
    check_model_location(args.model_path, "--model.path", chat_template=True)
    if args.adapter:
        check_model_location(args.adapter, "--adapter", kind="adapter")
