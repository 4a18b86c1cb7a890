"""The CLI's contract without any service: usage errors, options, output channels."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pgbctl.cli.common import Opts, opts
from pgbctl.cli.main import app

runner = CliRunner()


def run(*args, env=None):
    r = runner.invoke(app, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


def test_help_lists_every_noun():
    code, out, _ = run("--help")
    assert code == 0
    for noun in ("create", "delete", "status", "simulate", "query", "local"):
        assert noun in out


def test_version():
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("pgbctl ")


@pytest.mark.parametrize("args", [
    ["create", "--testid", "False"],
    ["create", "--testid", "has-dash"],
    ["create", "--survey", "ZTF!"],
    ["create", "--backend", "aws"],
    ["status", "--project", "UPPER_case"],
    ["simulate", "--rate", "fast", "--synthetic"],
    ["simulate", "--rate", "-5", "--synthetic"],
    ["nosuchcommand"],
])
def test_usage_errors_exit_2_on_stderr(args):
    code, out, err = run(*args)
    assert code == 2
    assert out == ""  # nothing on stdout
    assert err.strip()


def test_testid_from_environment_is_validated():
    code, _, err = run("create", "--dry-run", env={"PGBCTL_TESTID": "none"})
    assert code == 2 and "testid" in err.lower()


def test_production_delete_refused_before_touching_a_backend(tmp_path, monkeypatch):
    # no services are running in unit tests: the refusal must come first
    monkeypatch.setenv("PGBCTL_HOME", str(tmp_path))
    code, out, err = run("delete", "--survey", "ztf", "--yes")
    assert code == 2 and "PRODUCTION" in err and out == ""
    assert not (tmp_path / "services").exists() or not list((tmp_path / "services").glob("*.pid"))


def test_local_status_without_services_is_fast_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("PGBCTL_HOME", str(tmp_path))
    code, out, _ = run("local", "status", "--json")
    assert code == 0
    d = json.loads(out)
    assert set(d["services"]) == {"pubsub", "storage", "warehouse"}
    assert not any(s["running"] for s in d["services"].values())


def test_local_up_rejects_unknown_service(tmp_path, monkeypatch):
    monkeypatch.setenv("PGBCTL_HOME", str(tmp_path))
    code, _, err = run("local", "up", "redis")
    assert code == 2 and "redis" in err


def test_command_options_override_root_options():
    import typer

    root = typer.Context(typer.main.get_command(app))
    root.obj = Opts(testid="aaa", survey="ztf", json=False)
    merged = opts(root, testid="bbb", json=True, survey=None)
    assert (merged.testid, merged.survey, merged.json) == ("bbb", "ztf", True)
    assert merged.instance.topic("alerts") == "ztf-alerts-bbb"


def test_gcp_without_credentials_is_one_line_exit_1(tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    code, out, err = run("--backend", "gcp", "--project", "my-proj", "status", "--testid", "x")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "credentials" in err


def test_shell_completion_completes_nouns_and_verbs():
    import os
    import subprocess
    import sys

    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(cword), "_PGBCTL_COMPLETE": "complete_bash"}
        r = subprocess.run([sys.executable, "-c", "from pgbctl.cli.main import main; main()"],
                           env=env, capture_output=True, text=True, timeout=60)
        return r.stdout.split()

    # the program name the completion script registers is `pgbctl` (the console script)
    assert "local" in complete("pgbctl lo", 1)
    assert set(complete("pgbctl local ", 2)) >= {"up", "down", "status"}
