"""The command's options in process: defaults from RAPIDSERVE_* variables are checked like flags, --help shows
every default, and every failure reaches the user as one line without a traceback."""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path

import pytest

from rapidserve import _serve, cli
from rapidserve._options import bad_variable


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("RAPIDSERVE_GRPC_PORT", "abc", "expected an integer"),
        ("RAPIDSERVE_EXIT_TIMEOUT_SECS", "soon", "expected a number"),
        ("RAPIDSERVE_CACHE_SIZE", "12XB", "not a size"),
        ("RAPIDSERVE_GRPC_USE_SSL", "maybe", "expected true or false"),
        ("RAPIDSERVE_NO_METRICS", "perhaps", "expected true or false"),
        ("RAPIDSERVE_EXIT_ON_ERROR", "sometimes", "expected true or false"),
        ("RAPIDSERVE_MODEL_CONTROL_MODE", "manual", "expected one of none, explicit, poll"),
        ("RAPIDSERVE_LOG_LEVEL", "loud", "expected one of DEBUG"),
        ("RAPIDSERVE_FRONTENDS", "many", "expected a number of processes or auto"),
        ("RAPIDSERVE_FRONTENDS", "0", "expected at least 1"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it_and_its_value(
    variable: str, value: str, reason: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, value)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"rapidserve serve: error: environment variable {variable}={value!r}: {reason}")


def test_a_flag_replaces_a_bad_variable_and_unrelated_commands_ignore_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAPIDSERVE_GRPC_PORT", "abc")
    monkeypatch.setenv("RAPIDSERVE_EXIT_ON_ERROR", "false")
    monkeypatch.setenv("RAPIDSERVE_LOG_LEVEL", "debug")
    args = cli._parser().parse_args(["serve", "--grpc-port", "9001"])
    assert bad_variable(args) is None
    assert (args.grpc_port, args.exit_on_error, args.log_level) == (9001, False, "DEBUG")
    assert bad_variable(cli._parser().parse_args(["health"])) is None  # health has no --grpc-port
    assert cli._parser().parse_args(["serve"]).exit_on_error is False  # the variable's value stands


def test_exit_on_error_defaults_to_true_as_in_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAPIDSERVE_EXIT_ON_ERROR", raising=False)
    assert cli._parser().parse_args(["serve"]).exit_on_error is True
    assert cli._parser().parse_args(["serve", "--exit-on-error=false"]).exit_on_error is False
    assert cli._parser().parse_args(["serve", "--exit-on-error"]).exit_on_error is True


def test_a_port_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["serve", "--model-repository", str(tmp_path), "--metrics-port", "70000"]) == 2
    assert capsys.readouterr().err == (
        "rapidserve serve: error: --metrics-port must be a port number from 0 to 65535, got 70000\n"
    )


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rapidserve {metadata.version('rapidserve')}"


def test_help_shows_every_default_and_no_backticks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAPIDSERVE_GRPC_PORT", "RAPIDSERVE_URL", "RAPIDSERVE_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    for parser in _parsers(cli._parser()):
        text = parser.format_help()
        assert "`" not in text, parser.prog
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, "", [], argparse.SUPPRESS):
                continue
            shown = parser._get_formatter()._format_action(action)
            assert "default" in shown.lower(), (parser.prog, action.option_strings)
    serve = next(p for p in _parsers(cli._parser()) if p.prog.endswith(" serve")).format_help()
    assert "(default: 8001)" in " ".join(serve.split()) and "(default: 256MiB)" in " ".join(serve.split())


def test_an_unexpected_error_is_one_line_with_a_hint_and_the_traceback_only_at_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("the widget is bent")

    monkeypatch.setattr(cli, "_infer", broken)
    assert cli.main(["infer", "m"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "rapidserve infer: error: unexpected RuntimeError: the widget is bent "
        "(run with --log-level debug for the traceback)\n"
    )
    caplog.clear()
    with caplog.at_level("DEBUG", logger="rapidserve"):
        assert cli.main(["infer", "m", "--log-level", "debug"]) == 1
    assert any(record.exc_info and record.exc_info[0] is RuntimeError for record in caplog.records)


def test_interrupts_and_missing_files_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    missing = tmp_path / "x.npy"
    assert cli.main(["infer", "m", "--url", "127.0.0.1:1", "--input", f"pixels={missing}"]) == 1
    err = capsys.readouterr().err
    assert err == f"rapidserve infer: error: cannot read {missing}: No such file or directory\n"
    monkeypatch.setattr(cli, "_health", interrupted)
    assert cli.main(["health"]) == 130
    assert capsys.readouterr().err == "rapidserve health: interrupted\n"


def test_a_server_that_is_not_there_is_one_line_naming_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["infer", "m", "--url", "127.0.0.1:1", "--timeout-s", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rapidserve infer: error: [UNAVAILABLE]") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["infer", "health"])
def test_a_bad_ssl_variable_is_refused_not_read_as_off(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAPIDSERVE_SSL", "maybe")
    argv = [command, "--url", "127.0.0.1:1", *(["digits"] if command == "infer" else [])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"rapidserve {command}: error: environment variable RAPIDSERVE_SSL='maybe': expected true or false, got 'maybe'\n"
    )
    monkeypatch.setenv("RAPIDSERVE_SSL", "yes")
    assert cli._parser().parse_args(argv).ssl is True


def test_batching_mode_reaches_the_settings_from_the_flag_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RAPIDSERVE_BATCHING_MODE", raising=False)
    repository = ["--model-repository", str(tmp_path)]

    def mode(*argv: str) -> str:
        settings, _ = _serve.settings_of(cli._parser().parse_args(["serve", *repository, *argv]))
        return str(settings.batching_mode)

    assert mode() == "adaptive"
    assert mode("--batching-mode", "fixed") == "fixed"
    monkeypatch.setenv("RAPIDSERVE_BATCHING_MODE", "fixed")
    assert mode() == "fixed"
    assert mode("--batching-mode", "adaptive") == "adaptive"  # a flag wins over the variable


def test_frontends_reach_the_settings_and_auto_is_the_usable_cores_at_most_8(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RAPIDSERVE_FRONTENDS", raising=False)
    repository = ["--model-repository", str(tmp_path)]

    def frontends(*argv: str) -> int:
        settings, _ = _serve.settings_of(cli._parser().parse_args(["serve", *repository, *argv]))
        return int(settings.frontends)

    assert frontends() == 1
    assert frontends("--frontends", "3") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)))
    assert frontends("--frontends", "auto") == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 5, 7})
    assert frontends("--frontends", "AUTO") == 3
    monkeypatch.setenv("RAPIDSERVE_FRONTENDS", "2")
    assert frontends() == 2


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--frontend-shm-bytes", "1MiB"], "--frontend-shm-bytes must be at least --grpc-max-message-bytes"),
        (["--max-inflight-bytes", "512MiB"], "--max-inflight-bytes must be 0 or at least 8 x twice"),
    ],
)
def test_front_ends_need_room_for_the_largest_message_each(
    flags: list[str], complaint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each front end must fit a request of the largest size in its shared memory and its budget share."""
    monkeypatch.delenv("RAPIDSERVE_FRONTENDS", raising=False)
    argv = ["serve", "--model-repository", str(tmp_path), "--frontends", "8", *flags]
    with pytest.raises(ValueError, match=complaint):
        _serve.settings_of(cli._parser().parse_args(argv))
    settings, _ = _serve.settings_of(cli._parser().parse_args(["serve", "--model-repository", str(tmp_path), *flags]))
    assert settings.frontends == 1  # (one process: nothing to divide)


def test_a_bad_batching_mode_variable_is_one_line_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("RAPIDSERVE_BATCHING_MODE", "sometimes")
    assert cli.main(["serve", "--model-repository", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "rapidserve serve: error: environment variable RAPIDSERVE_BATCHING_MODE='sometimes': "
        "expected one of adaptive, fixed, got 'sometimes'\n"
    )


INTEGERS, NUMBERS = "comma-separated positive integers", "comma-separated positive numbers"


@pytest.mark.parametrize(
    ("command", "option", "value", "expected"),
    [
        ("prepare", "--batch-sizes", "a,b", INTEGERS),
        ("prepare", "--batch-sizes", "1,0", INTEGERS),
        ("prepare", "--threads", "0", "a positive integer"),
        ("prepare", "--bench-seconds", "-1", "a positive number"),
        ("bench", "--concurrency", "1,x", INTEGERS),
        ("bench", "--concurrency", "1.5", INTEGERS),
        ("bench", "--request-rate", "10,", NUMBERS),
        ("bench", "--request-rate", "nan", NUMBERS),
        ("bench", "-b/--batch-size", "0", "a positive integer"),
        ("bench", "--connections", "0", "a positive integer"),
        ("bench", "--workers", "two", "a positive integer"),
        ("bench", "--measurement-interval", "0", "a positive integer"),
        ("bench", "--max-trials", "-3", "a positive integer"),
        ("bench", "--timeout-s", "0", "a positive number"),
        ("bench", "--max-p99-ms", "inf", "a positive number"),
    ],
)
def test_a_bad_number_or_list_of_prepare_and_bench_is_a_usage_error_naming_the_option(
    command: str, option: str, value: str, expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # (were a bad value to pass, prepare would write to --out and bench would call an address nothing serves)
    required = ["--demo", "--out", str(tmp_path / "repo")] if command == "prepare" else ["m", "--url", "127.0.0.1:1"]
    with pytest.raises(SystemExit) as info:
        cli.main([command, *required, option.split("/")[-1], value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    assert err.splitlines()[-1] == f"rapidserve {command}: error: argument {option}: expected {expected}, got {value!r}"


def test_lists_of_prepare_and_bench_parse_to_numbers() -> None:
    prepare = cli._parser().parse_args(["prepare", "--demo", "--out", "o", "--batch-sizes", "1, 8,32"])
    assert (prepare.batch_sizes, prepare.threads) == ([1, 8, 32], None)
    bench = cli._parser().parse_args(["bench", "m", "--request-rate", "0.5,200"])
    assert (bench.request_rate, bench.concurrency) == ([0.5, 200.0], None)
    assert cli._parser().parse_args(["bench", "m", "--concurrency", "4,16"]).concurrency == [4, 16]
