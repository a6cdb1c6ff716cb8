"""`pam-jax serve`: bad arguments are one `error:` line and exit code 2, before any model load."""

from __future__ import annotations

from pam_jax.cli import main


def test_bad_arguments(model_dir, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--queue-size", "0"]) == 2
    assert "error:" in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ("--model", "--host", "--port", "--queue-size", "--max-batch"))
