"""CLI: help on every subcommand, validated factory names, errors as messages (exit 2)."""

from __future__ import annotations

import pytest

from looptrace.cli import build_parser, load_attr, main


@pytest.mark.parametrize(
    "cmd", ["train", "demo", "analyze", "report", "bench", "featurize", "score", "topk", "inspect", "explore"]
)
def test_every_subcommand_has_help(cmd: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["os.system('x')", "os:system;rm", "__import__('os'):x", "a b:c", "mod"])
def test_factory_names_are_validated(bad: str) -> None:
    import looptrace as lt

    with pytest.raises(lt.ConfigError, match=r"package\.module:function"):
        load_attr(bad, "--model")


def test_factory_import_errors_are_clear() -> None:
    import looptrace as lt

    with pytest.raises(lt.ConfigError, match="cannot import"):
        load_attr("no_such_module_here:f", "--model")
    with pytest.raises(lt.ConfigError, match="has no attribute"):
        load_attr("json:no_such_function", "--loss")
    assert load_attr("json:dumps", "--loss") is __import__("json").dumps


def test_errors_are_reported_not_raised(tmp_path, capsys) -> None:
    assert main(["inspect", "--store", str(tmp_path / "nothing")]) == 2
    assert "not a looptrace feature store" in capsys.readouterr().err
