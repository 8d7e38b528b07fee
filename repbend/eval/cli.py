"""Entry points of `repbend eval`, `repbend logit-lens` and `repbend rep-shift` (dispatched by `repbend.cli`).

    repbend eval --model.path DIR [--model.adapter DIR] [--eval.harmbench FILE] [--eval.xstest FILE]
                 [--eval.attacks direct,prefill,input_embed,transfer] [--eval.transfer FILE]
                 [--eval.judges keywords,demo,harmbench=DIR,wildguard=DIR] [--gen.max_new_tokens N]
                 [--gen.batch_size N] --eval.output DIR
    repbend eval --eval.compare RUN_A RUN_B [--eval.output DIR]
    repbend logit-lens --model.path DIR [--model.adapter DIR] --lens.prompt TEXT [--lens.response_prefix TEXT]
                 [--lens.view both|diff] --lens.output FILE.png
    repbend rep-shift --model.path DIR --model.adapter DIR --shift.safe FILE --shift.unsafe FILE --shift.output DIR

Options are `--group.key` as in `repbend train` (`repbend.cli_options`): --model.* (the evaluated model, shared by
all three), --eval.*, --gen.*, --input_embed.*, --judge.*, --lens.*, --shift.*. The older spellings (--adapter,
--harmbench, --output, --max-tokens, ...) still work for one release and print one deprecation line. Errors the
user can fix are one line: argparse's own (exit 2), `UsageError` for a bad option value,
`repbend.data.errors.DataError` for a file, row or field; every input is checked before a model is loaded (see
`inputs.py`).
"""
from __future__ import annotations

import json
from pathlib import Path

from repbend.cli_options import OptionParser, add_option

class UsageError(ValueError):
    """A bad option value of `repbend eval`, `logit-lens` or `rep-shift`, in one line naming the option; the
    `repbend` command prints it as `repbend: error: <message>` and exits with status 2."""


def _model_args(p: OptionParser, *, required: bool = True, adapter_required: bool = False) -> None:
    g = p.add_group("model", "the evaluated model (spelled as in `repbend train`)")
    add_option(g, "--model.path", dest="model_path", required=required, metavar="DIR",
               help="HF model directory (or hub id org/name)" + (" (required)" if required else ""))
    add_option(g, "--model.adapter", "--adapter", dest="adapter", required=adapter_required, metavar="DIR",
               help="PEFT adapter directory (applied unmerged; it must belong to --model.path)"
                    + (" (required)" if adapter_required else ""))
    add_option(g, "--model.dtype", "--dtype", dest="dtype", default="auto",
               help="auto (bf16 GPU / fp32 CPU), bf16 (bfloat16), fp16 (float16), fp32 (float32)")
    add_option(g, "--model.device", "--device", dest="device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_judges(text: str) -> list[tuple[str, str | None]]:
    """"keywords,demo,harmbench=DIR,wildguard=DIR" -> [("keywords", None), ("demo", None), ("harmbench", DIR), ...].
    UsageError for an unknown judge, a classifier without its directory, a directory given to a rule judge, or a
    judge named twice."""
    from .judges import JUDGE_INFO

    known = ", ".join(f"{n}=DIR" if i.classifier else n for n, i in JUDGE_INFO.items())
    judges: list[tuple[str, str | None]] = []
    for part in _list(text):
        name, eq, path = (x.strip() for x in part.partition("="))
        if name not in JUDGE_INFO:
            raise UsageError(f"--eval.judges: unknown judge {name!r}; known: {known}")
        if not JUDGE_INFO[name].classifier and eq:
            raise UsageError(f"--eval.judges {part}: the {name} judge takes no directory")
        if JUDGE_INFO[name].classifier and not path:
            raise UsageError(f"--eval.judges: {name} needs its classifier: {name}=DIR")
        if any(name == seen for seen, _ in judges):
            raise UsageError(f"--eval.judges: {name} is given twice")
        judges.append((name, path or None))
    if not judges:
        raise UsageError("--eval.judges: no judge given")
    return judges


EVAL_DESCRIPTION = """\
Attack success rate on HarmBench and over-refusal on XSTest, for a model with an optional PEFT adapter: writes
OUTPUT/generations.jsonl (resumable; rows are keyed by the model's and adapter's fingerprints, the dtype, the
generation settings and the prompt, so a rerun into the same directory with other weights generates anew),
summary.json and summary.md. --eval.compare RUN_A RUN_B puts two finished runs side by side.

What each judge's figure measures (every figure is printed next to its judge):
  keywords      refusal phrases only: HarmBench "asr" is the share of answers WITHOUT a refusal phrase, so a model
                that derails instead of refusing (what RepBend does) and every benign answer count as attacks. A
                refusal rate; it undercounts a bent model's safety.
  demo          the demo's pattern judge, for `repbend demo`'s synthetic prompts: "harmful" = the answer walks
                through the synthetic compliant steps (a refusal or a derailment is not); on a row with an expected
                answer (XSTest file's `answer` column) "accuracy". No model needed.
  harmbench=DIR the HarmBench classifier (cais/HarmBench-Llama-2-13b-cls, a local directory or hub id): is the
                generation an instance of the behaviour (HarmBench rows). The paper's ASR.
  wildguard=DIR WildGuard (allenai/wildguard): harmful response ("wildguard") and refusal ("wildguard_refusal").

HarmBench JSON (--eval.harmbench): {"data": [{"behavior": "...", "context": "..."?, "default_target": "..."?,
"id" | "behavior_id" | "BehaviorID": "..."?, "category": "..."?, "messages": [{"role", "content"}]?}, ...]}
(the README lists every key); or HarmBench's behaviours CSV with --eval.harmbench_targets for the targets.

Transfer file (--eval.transfer), ready-made attack prompts keyed by HarmBench BehaviorID, each the whole user
message: JSON {"<BehaviorID>": ["prompt", ...] or [{"prompt": "...", "method": "PAIR"}, ...]} or JSONL, one
{"behavior_id": "...", "prompt": "...", "method": "..."} a line ("id" is accepted for "behavior_id"). A prompt
with a method runs as attack "transfer:<method>", without one as "transfer".
"""


def eval_parser() -> OptionParser:
    from .judges import JUDGE_INFO

    p = OptionParser(prog="repbend eval", description=EVAL_DESCRIPTION)
    _model_args(p, required=False)
    g = p.add_group("eval", "what to evaluate, how to judge it, where to write")
    add_option(g, "--eval.harmbench", "--harmbench", dest="harmbench", metavar="FILE",
               help="HarmBench behaviours: JSON {\"data\": [...]} (keys in the README) or the HarmBench CSV")
    add_option(g, "--eval.harmbench_targets", "--harmbench-targets", dest="harmbench_targets", metavar="FILE",
               help="JSON BehaviorID -> target string (the HarmBench CSV has no targets)")
    add_option(g, "--eval.xstest", "--xstest", dest="xstest", metavar="FILE",
               help="XSTest prompts CSV (id, type, prompt, ...; optional answer)")
    add_option(g, "--eval.attacks", "--attacks", dest="attacks", default="direct",
               help="comma list of direct, prefill, input_embed, transfer")
    add_option(g, "--eval.transfer", "--transfer", dest="transfer", metavar="FILE",
               help="transfer attack prompts, JSON or JSONL (format above)")
    add_option(g, "--eval.judges", "--judges", dest="judges", default="keywords",
               help="comma list of " + ", ".join(f"{n}=DIR" if i.classifier else n for n, i in JUDGE_INFO.items())
                    + " (what each measures: above)")
    add_option(g, "--eval.limit", "--limit", dest="limit", type=int, metavar="N",
               help="only the first N items of each benchmark (smoke runs)")
    add_option(g, "--eval.output", "--output", dest="output", metavar="DIR",
               help="run directory: generations.jsonl, summary.json, summary.md (required unless --eval.compare)")
    add_option(g, "--eval.compare", "--compare", dest="compare", nargs=2, metavar=("RUN_A", "RUN_B"),
               help="put two finished runs (directories with summary.json) side by side; needs no model")
    g = p.add_group("gen", "generation (greedy, part of each row's key)")
    add_option(g, "--gen.max_new_tokens", dest="max_new_tokens", type=int, default=512, metavar="N",
               help="new tokens at most per answer")
    add_option(g, "--gen.batch_size", dest="batch_size", type=int, default=16, metavar="N",
               help="prompts per generate call (not part of the key)")
    g = p.add_group("input_embed", "the input-embedding (soft prompt) attack")
    add_option(g, "--input_embed.tokens", dest="embed_tokens", type=int, metavar="N", default=20,
               help="soft prompt length")
    add_option(g, "--input_embed.steps", dest="embed_steps", type=int, metavar="N", default=500,
               help="Adam steps (budget)")
    add_option(g, "--input_embed.lr", dest="embed_lr", type=float, metavar="LR", default=1e-3, help="Adam lr")
    add_option(g, "--input_embed.stop_loss", dest="embed_stop_loss", type=float, metavar="LOSS", default=0.05,
               help="stop once every soft prompt's target loss is below this")
    add_option(g, "--input_embed.batch_size", dest="embed_batch_size", type=int, metavar="N", default=8,
               help="soft prompts optimised together")
    g = p.add_group("judge", "the classifier judges")
    add_option(g, "--judge.batch_size", dest="judge_batch_size", type=int, metavar="N", default=8,
               help="rows per classifier call")
    return p


def main_eval(argv: list[str]) -> int:
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.compare:
        return _compare(*args.compare, output=args.output)
    if not args.model_path or not args.output:
        parser.error("--model.path and --eval.output are required (or --eval.compare RUN_A RUN_B)")
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
        raise UsageError(f"--eval.output {output}: exists and is not a directory")
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
    p = OptionParser(prog="repbend logit-lens",
                     description="Layers x tokens heatmap of the logit lens (each layer's next-token prediction, "
                                 "lm_head(norm(h))): with --lens.view both, base (adapter off) above tuned; with "
                                 "--lens.view diff, one map of where they disagree: the change in the probability "
                                 "of the base model's top-1 token, and the tuned top-1 token where it differs.")
    _model_args(p)
    g = p.add_group("lens", "the prompt and the picture")
    add_option(g, "--lens.prompt", "--prompt", dest="prompt", required=True, metavar="TEXT",
               help="the user message (required)")
    add_option(g, "--lens.response_prefix", "--response-prefix", dest="response_prefix", default="", metavar="TEXT",
               help="text written after the generation prompt (the start of a response)")
    add_option(g, "--lens.max_tokens", "--max-tokens", dest="max_tokens", type=int, default=32, metavar="N",
               help="show the last N tokens")
    add_option(g, "--lens.view", dest="view", choices=("both", "diff"), default="both",
               help="both: base and tuned maps coloured by entropy; diff: tuned - base (needs --model.adapter)")
    add_option(g, "--lens.output", "--output", dest="output", required=True, metavar="FILE", help="PNG file (required)")
    args = p.parse_args(argv)
    from .inputs import check_positive

    if not args.prompt.strip():
        raise UsageError("--lens.prompt: empty")
    check_positive(args.max_tokens, "--lens.max_tokens")
    if args.view == "diff" and not args.adapter:
        raise UsageError("--lens.view diff compares base and tuned: give --model.adapter")
    if Path(args.output).is_dir():
        raise UsageError(f"--lens.output {args.output}: is a directory (expected a PNG file name)")
    _check_model(args)
    from .lens import diff_summary, lens_diff, lens_views, plot_lens, plot_lens_diff
    from .run import load_model

    model, tokenizer = load_model(args.model_path, args.adapter, args.dtype, args.device)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    title = f"logit lens: {args.prompt[:60]}"
    if args.view == "diff":
        diff = lens_diff(model, tokenizer, args.prompt, args.response_prefix, args.max_tokens)
        plot_lens_diff(diff, args.output, title=title)
        print(diff_summary(diff))
    else:
        views = lens_views(model, tokenizer, args.prompt, args.response_prefix, args.max_tokens)
        plot_lens(views, args.output, title=title)
    print(f"wrote {args.output}")
    return 0


def main_rep_shift(argv: list[str]) -> int:
    p = OptionParser(prog="repbend rep-shift",
                     description="Per-layer L2 distance and cosine between base and tuned representations")
    _model_args(p, adapter_required=True)
    g = p.add_group("shift", "the prompt sets and the output")
    add_option(g, "--shift.safe", "--safe", dest="safe", required=True, metavar="FILE",
               help="safe prompts: JSONL with \"prompt\" or one prompt a line (required)")
    add_option(g, "--shift.unsafe", "--unsafe", dest="unsafe", required=True, metavar="FILE",
               help="unsafe prompts, same formats (required)")
    add_option(g, "--shift.positions", "--positions", dest="positions", choices=("last", "all"), default="last",
               help="last request token, or all request tokens")
    add_option(g, "--shift.batch_size", "--batch-size", dest="batch_size", type=int, default=8, metavar="N",
               help="prompts per forward pass")
    add_option(g, "--shift.output", "--output", dest="output", required=True, metavar="DIR",
               help="directory: rep_shift.csv, rep_shift.png (required)")
    args = p.parse_args(argv)
    from .inputs import check_positive

    check_positive(args.batch_size, "--shift.batch_size")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--shift.output {args.output}: exists and is not a directory")
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
    from .adapter_fit import check_adapter_fits

    check_model_location(args.model_path, "--model.path", chat_template=True)
    if args.adapter:
        check_model_location(args.adapter, "--model.adapter", kind="adapter")
        check_adapter_fits(args.model_path, args.adapter)
