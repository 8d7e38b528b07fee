"""One flag style (`repbend.cli_options`): --group.key options, older spellings as aliases that say once that they
are deprecated and name the new flag, required options satisfied by either spelling, no abbreviations; the demo's
options; `repbend --version`."""
import pytest

from repbend.cli_options import OptionParser, add_option


def _parser():
    p = OptionParser(prog="repbend x", description="test")
    g = p.add_group("train", "the run")
    add_option(g, "--train.max_steps", "--max-steps", type=int, default=3, help="steps")
    add_option(g, "--train.output_dir", "--output", required=True, metavar="DIR", help="where")
    add_option(g, "--train.fast", "--fast", action="store_true", help="a switch")
    add_option(g, "--train.pair", "--pair", nargs=2, help="two values")
    return p


def test_new_and_old_spellings_give_the_same_values(capsys):
    new = _parser().parse_args(["--train.max_steps", "7", "--train.output_dir=o", "--train.fast",
                                "--train.pair", "a", "b"])
    assert capsys.readouterr().err == ""
    old = _parser().parse_args(["--max-steps", "7", "--output", "o", "--fast", "--pair", "a", "b"])
    assert vars(new) == vars(old) == {"train_max_steps": 7, "train_output_dir": "o", "train_fast": True,
                                      "train_pair": ["a", "b"]}
    err = capsys.readouterr().err.splitlines()
    assert err == [f"repbend: warning: {o} is deprecated and will be removed in the next release; use {n}"
                   for o, n in (("--max-steps", "--train.max_steps"), ("--output", "--train.output_dir"),
                                ("--fast", "--train.fast"), ("--pair", "--train.pair"))]


def test_required_abbreviation_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--train.max_steps", "2"])
    assert e.value.code == 2 and "the following arguments are required: --train.output_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--train.output_dir", "o", "--train.max", "2"])  # no guessing at --train.max_steps
    assert e.value.code == 2 and "unrecognized arguments: --train.max" in capsys.readouterr().err
    text = _parser().format_help()
    assert "--train.*" in text and "the run" in text and "(default: 3)" in text
    head, _, older = text.partition("older spellings")
    assert "--max-steps" not in head and "--max-steps = --train.max_steps" in " ".join(older.split())


def test_demo_options(capsys):
    from repbend.demo.run import DEMO_METHODS, parser

    new = parser().parse_args(["--train.output_dir", "d", "--train.seed", "3", "--train.max_steps", "5",
                               "--train.eval_every", "2", "--loss.method", "rmu", "--sft.steps", "9"])
    old = parser().parse_args(["--output", "d", "--seed", "3", "--max-steps", "5", "--eval-every", "2",
                               "--method", "rmu", "--sft-steps", "9"])
    assert vars(new) == vars(old)
    assert (new.output, new.seed, new.max_steps, new.eval_every, new.method, new.sft_steps) == ("d", 3, 5, 2, "rmu", 9)
    assert len([line for line in capsys.readouterr().err.splitlines() if "is deprecated" in line]) == 6
    text = parser().format_help()
    for method in DEMO_METHODS:  # the choices come from the method table
        assert method in text
    with pytest.raises(SystemExit):
        parser().parse_args(["--loss.method", "sft"])


def test_version(capsys):
    from repbend import __version__
    from repbend.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"repbend {__version__}"
