import subprocess
import sys

import pytest

from pathanat.cli import _summary, build_parser, main

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"pathanat {command}" in out.split("example:")[1]
    assert "%%" not in out  # a percent sign is written once (argparse formats the summary only)


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in SUBCOMMANDS)
    assert "95% CIs" in out  # a literal percent sign in a sub-command's summary


def test_console_script_runs_as_module():
    done = subprocess.run(
        [sys.executable, "-m", "pathanat.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("pathanat ")


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-cohort"
    code = main(["prepare", "--cohort", str(missing), "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err
    assert "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_summary_prints_estimates_with_their_interval():
    result = {
        "nll": {"bits": {"mean": 1.0, "ci_low": 0.5, "ci_high": 1.5, "n_slices": 3}},
        "split": "test",
        "psnr": 26.123456,
        "per_slice": [1.0, 2.0],
    }
    assert _summary(result) == ["nll.bits: 1 [0.5, 1.5]", "split: test", "psnr: 26.12"]


def test_a_bug_shows_its_traceback_and_a_user_error_one_line(monkeypatch, capsys):
    """A PathanatError is the user's to fix: one line, exit 2. Anything else is ours: it must
    propagate (Python prints the traceback), not pass for a user error."""
    from pathanat import cli
    from pathanat.errors import PathanatError

    def user_error(args):
        raise PathanatError("--out x: is a file")

    def bug(args):
        raise ValueError("training_loss: supervision needs both seg_logits and mask")

    monkeypatch.setattr(cli, "_demo", user_error)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err.strip() == "pathanat demo: error: --out x: is a file"
    monkeypatch.setattr(cli, "_demo", bug)
    with pytest.raises(ValueError, match="supervision needs both"):
        main(["demo"])


class CalledError(Exception):
    """Raised by a stand-in for a library function, carrying the keywords it was called with."""


@pytest.mark.parametrize(
    ("argv", "module", "function", "keywords"),
    [
        (["phantom", "--kind", "ms", "--subjects", "2", "--out", "c"], "pathanat.data.phantom",
         "generate_cohort", {"kind", "n_subjects", "out_dir", "overwrite", "progress"}),
        (["phantom", "--kind", "ms", "--subjects", "2", "--out", "c", "--full"],
         "pathanat.data.phantom", "generate_cohort",
         {"kind", "n_subjects", "out_dir", "overwrite", "progress", "slab_mm"}),
        (["prepare", "--cohort", "c", "--out", "o"], "pathanat.data.prepare", "prepare_cohort",
         {"cohort", "out", "overwrite", "progress", "entities"}),
        (["evaluate", "r"], "pathanat.evaluation.evaluate", "evaluate_run",
         {"with_fid", "progress"}),
        (["evaluate", "r", "--iw-samples", "100"], "pathanat.evaluation.evaluate", "evaluate_run",
         {"with_fid", "progress", "iw_samples"}),
        (["analyze", "r"], "pathanat.evaluation.analyze", "analyze_run", set()),
        (["synthesize", "r"], "pathanat.evaluation.synthesis", "synthesize_run", set()),
        (["validity", "r", "--samples", "8"], "pathanat.evaluation.validity", "validity_run",
         {"n"}),
        (["counterfactual", "r"], "pathanat.evaluation.counterfactual", "counterfactual_run",
         set()),
        (["reproduce", "--dataset", "ms"], "pathanat.reproduce", "reproduce", set()),
        (["demo"], "pathanat.demo", "run_demo", {"out", "overwrite"}),
    ],
)
def test_an_option_left_out_leaves_the_library_default(argv, module, function, keywords,
                                                      monkeypatch):
    """The library owns its defaults: the command passes on only the options it was given."""
    import importlib

    def stand_in(*args, **kwargs):
        raise CalledError(kwargs)

    monkeypatch.setattr(importlib.import_module(module), function, stand_in)
    with pytest.raises(CalledError) as called:
        main(argv)
    assert set(called.value.args[0]) == keywords


def test_help_quotes_the_library_defaults(capsys):
    import inspect

    from pathanat.evaluation.evaluate import evaluate_run

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    default = inspect.signature(evaluate_run).parameters["iw_samples"].default
    assert f"S of the IW bound (default {default})" in " ".join(capsys.readouterr().out.split())
