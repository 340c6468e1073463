"""`keel serve`'s API key (issue 17 item 5): KEEL_API_KEY is preferred over --api-key, because a
command line is readable by every user of the machine (ps) and a process's environment is not."""

import sys

import pytest

import keel.serve.app


def run_serve(monkeypatch, capsys, *args):
    """Run `keel serve ARGS` in this process up to the point it would start serving; returns the
    ServeConfig it would serve with and stderr."""
    from keel.cli import main

    seen = []
    monkeypatch.setattr(keel.serve.app, "serve", lambda model, cfg: seen.append(cfg))
    monkeypatch.setattr(sys, "argv", ["keel", "serve", "--model", "m", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    return seen[0], capsys.readouterr().err


def test_keel_api_key_wins_over_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("KEEL_API_KEY", "from-env")
    cfg, err = run_serve(monkeypatch, capsys, "--api-key", "from-flag")
    assert cfg.api_key == "from-env" and "using KEEL_API_KEY" in err


def test_the_flag_works_with_a_warning_and_the_env_alone_silently(monkeypatch, capsys):
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    cfg, err = run_serve(monkeypatch, capsys, "--api-key", "from-flag", "--max-waiting", "3",
                         "--request-timeout-s", "2.5")
    assert cfg.api_key == "from-flag" and "set KEEL_API_KEY instead" in err
    assert (cfg.max_waiting, cfg.request_timeout_s) == (3, 2.5)
    monkeypatch.setenv("KEEL_API_KEY", "from-env")
    cfg, err = run_serve(monkeypatch, capsys)
    assert cfg.api_key == "from-env" and err == ""
