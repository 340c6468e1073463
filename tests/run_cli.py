"""The `keel` command run in the test's own process: for commands whose start (an ONNX export,
vLLM's engine) is too slow to repeat in a subprocess."""

import sys


def keel(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `keel ARGS...`."""
    from keel.cli import main

    monkeypatch.setattr(sys, "argv", ["keel", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
