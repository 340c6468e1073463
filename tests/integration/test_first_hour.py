"""Issue 18, the first hour of a new user: the README's commands as written, interrupting and
rerunning a run, what the terminal says about faults, flags for the fields people tune, the plots."""

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.config import EvalConfig, LabelConfig, RLConfig, SFTConfig
from keel.label.run import agreement_figure
from keel.models import init_model, save_model
from keel.report import RL_PLOTS, figure, format_goodput, goodput

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
VENV_BIN = ROOT / ".venv" / "bin"


def keel_env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def keel(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "keel", *map(str, args)], capture_output=True, text=True,
                          env=keel_env(), timeout=300, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    model, tok = init_model("llama", layers=1, hidden=32, seed=0)
    save_model(model, tok, out)
    return out


# ----------------------------------------------------------------------------- 1: README verbatim


def readme_commands(block: str) -> list[str]:
    """The commands of a bash block: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_commands_run_verbatim_after_its_first_command(tmp_path):
    """The README's first command sets up and enters the environment; the block it marks for CI
    then runs exactly as written, in a shell where keel is on PATH only through that command."""
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    setup = readme_commands(first_block)[0]
    assert setup.startswith("./setup.sh demo && "), setup
    activate = setup.removeprefix("./setup.sh demo && ")  # setup.sh itself ran before the tests (.ci/run)
    assert (VENV_BIN / "keel").is_file(), "run ./setup.sh first: the README's commands need its .venv"
    marked = re.search(r"<!-- run verbatim in CI -->\n```bash\n(.*?)```", README, re.S).group(1)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    script = f"set -e\ncd {shlex.quote(str(ROOT))}\n{activate}\ncd {shlex.quote(str(tmp_path))}\n{marked}"
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                       env={**env, "PATH": path, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "config.json").is_file() and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 1000


def test_ci_runs_the_readmes_test_command():
    test_command = next(c for c in readme_commands(re.search(r"```bash\n(.*?)```", README, re.S).group(1))
                        if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_examples_use_only_what_an_earlier_command_makes():
    """Every --model and --recipe in the README is made by a command above it (or is a placeholder
    in capitals, or a file in the repository)."""
    blocks = [(m.start(), m.end(), m.group(1)) for m in re.finditer(r"```bash\n(.*?)```", README, re.S)]
    found = [(start, i, c) for start, _, block in blocks for i, c in enumerate(readme_commands(block))
             if c.startswith(("keel ", "torchrun "))]
    found += [(m.start(), 0, m.group(1)) for m in re.finditer(r"`(keel [^`]+)`", README)
              if not any(start <= m.start() < end for start, end, _ in blocks)]
    made = set()
    for *_, command in sorted(found):
        args = command.split()
        for flag, value in zip(args, args[1:]):
            if flag == "--model" and not value.isupper():
                assert value.rstrip("/") in made, f"{command!r}: nothing above makes {value}"
            if flag == "--recipe":
                assert (ROOT / value).is_file(), command
        if "demo" in args:
            made |= {"runs/demo", "runs/demo/model", "runs/demo/sft/model"}
        for flag, value in zip(args, args[1:]):
            if flag == "--out":
                made |= {value.rstrip("/"), value.rstrip("/") + "/model"}


def test_data_to_stdout_for_a_dash(tmp_path):
    r = keel("data", "--task", "arithmetic", "--n", "3", "--out", "-", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["question"] for line in r.stdout.splitlines()] and len(r.stdout.splitlines()) == 3
    assert not (tmp_path / "-").exists() and "to stdout" in r.stderr


# ----------------------------------------------------------------------------- 2: a shared machine


def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise():
    probe = ("import os, sys\nfrom keel.cli import main\nsys.argv = ['keel', 'data', '--help']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "import torch\nfrom keel.device import usable_cpus\n"
             "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), usable_cpus())")
    env = {k: v for k, v in keel_env().items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    policy, threads, cpus = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                           env=env, check=True).stdout.split()[-3:]
    assert policy == "PASSIVE" and threads == cpus and int(cpus) <= len(os.sched_getaffinity(0))
    mine = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**env, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}).stdout.split()[-3:]
    assert mine[:2] == ["ACTIVE", "1"]


# ----------------------------------------------------------------------------- 4, 5, 7: a run, interrupted


def wait_for(predicate, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def test_ctrl_c_says_how_to_continue_and_a_rerun_never_overwrites_checkpoints(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny), "--out", str(out), "-o", "digits=2", "--steps", "5000",
            "--checkpoint-every", "3", "--lr", "1e-3", "--examples", "64", "--batch-tokens", "512",
            "--set", "warmup=0", "--set", "resilience.keep=1", "--inject", "nan_grad@step=2"]
    proc = subprocess.Popen([sys.executable, "-m", "keel", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=keel_env())
    wait_for(lambda: any((out / "checkpoints").glob("0*")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # item 5: the injected fault and the step it skipped were announced as they happened
    assert "fault injected: nan_grad@step=2" in err and "sft step 2 skipped, no update (nonfinite)" in err
    # item 4: where the newest checkpoint is, and the exact command that continues from it
    newest = max((out / "checkpoints").glob("0*"))
    assert f"the newest checkpoint is {newest} (step {int(newest.name)})" in err, err
    assert f"keel {shlex.join(args)} --resume" in err
    again = keel(*args)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr
    assert again.stderr.startswith("error: ") and "--resume" in again.stderr and "--fresh" in again.stderr
    assert newest.is_dir()  # the refused run touched nothing

    # the printed command resumes (and says so), then a second Ctrl-C again names the newest checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "keel", *args, "--resume"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=keel_env())
    wait_for(lambda: max((out / "checkpoints").glob("0*"), default=newest) != newest, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"sft: resumed from the checkpoint of step {int(newest.name)}" in err, err
    # the run's report counts the skipped step from events.jsonl and blames the fault for lost time
    g = goodput(out)
    assert g["skipped_steps"] == 1 and g["other_s"] == 0.0


def test_chat_ctrl_c_stops_the_reply_not_the_chat(tiny):
    from keel.engine.backends import load_backend
    from keel.serve.chat import chat

    backend, tokenizer = load_backend(tiny, "torch", "cpu", "fp32", "cpu")
    lines = iter(["1+1", "2+2", "/exit"])
    shown, interrupts = [], []

    def write(text):
        shown.append(text)
        if len(interrupts) < 1 and text and "(thinking)" not in text and "\n" not in text and len(shown) > 3:
            interrupts.append(len(shown))
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the first reply

    try:
        # sampled: this random model's greedy reply is empty; seed 0's first reply is 70 pieces long
        replies = chat(backend, tokenizer, max_tokens=200, temperature=1.0, seed=0, read=lambda prompt: next(lines),
                       write=write)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the chat")
    text = "".join(shown)
    assert interrupts and text.count(" (stopped)\n") == 1
    assert replies == 2  # the stopped reply, and the next question answered after it
    assert len(text) > text.index(" (stopped)\n") + len(" (stopped)\n")


# ----------------------------------------------------------------------------- 5: keel report


def write_run(folder: Path, events: list[dict], rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_report_blames_no_faults_on_a_run_without_any(tmp_path):
    rows = [{"stage": "rl", "step": s, "step_s": 1.0} for s in (1, 2, 3)]
    clean = write_run(tmp_path / "clean", [{"time": 0.0, "event": "run_start"}, {"time": 4.0, "event": "run_end"}], rows)
    g = goodput(clean)
    assert (g["lost_s"], g["other_s"], g["skipped_steps"]) == (0.0, 1.0, 0)
    assert "lost to faults" not in "\n".join(format_goodput(g))


def test_report_counts_skips_from_events_even_when_their_rows_were_rolled_back(tmp_path):
    events = [{"time": 0.0, "event": "run_start"}, {"time": 1.0, "event": "fault_injected", "fault": "nan_grad@step=2"},
              {"time": 1.5, "event": "skip", "stage": "rl", "step": 2, "reason": "nonfinite"},
              {"time": 2.0, "event": "restart"}, {"time": 10.0, "event": "run_end"}]
    rows = [{"stage": "rl", "step": s, "step_s": 1.0} for s in (1, 2, 3)]  # step 2 redone after the restart
    g = goodput(write_run(tmp_path / "faulty", events, rows))
    assert (g["skipped_steps"], g["useful_steps"], g["lost_s"], g["other_s"]) == (1, 3, 7.0, 0.0)
    assert "lost to faults" in format_goodput(g)[0] and "1 skipped" in format_goodput(g)[1]


# ----------------------------------------------------------------------------- 7: flags that exist


@pytest.mark.parametrize("command, cls", [("sft", SFTConfig), ("rl", RLConfig), ("eval", EvalConfig),
                                          ("label", LabelConfig)])
def test_every_recipe_field_an_error_names_has_a_flag_that_exists(command, cls):
    import typer

    from keel.cli import _flag_hint, app  # the CLI's own mapping is what is tested

    click_command = typer.main.get_command(app).commands[command]
    options = {o for p in click_command.params for o in p.opts}
    fields = []
    for f in dataclasses.fields(cls):
        section = getattr(cls(), f.name)
        fields += ([f"{f.name}.{g.name}" for g in dataclasses.fields(section)] if dataclasses.is_dataclass(section)
                   else [f.name])
    for field in fields:
        hint = _flag_hint(field, [command])
        assert hint, f"keel {command}: an error about {field} would name no flag"
        assert hint.split()[0].lstrip("(").rstrip(")") in options, (field, hint)


def test_set_reaches_any_field_and_reports_unknown_ones(tiny, tmp_path):
    from keel.cli import _stage_config

    cfg = _stage_config(RLConfig, None, ["lr=1e-4", "resilience.keep=5", "lora.r=4"], lr=None, group_size=4)
    assert (cfg.lr, cfg.resilience.keep, cfg.lora.r, cfg.group_size) == (1e-4, 5, 4, 4)
    r = keel("rl", "--model", tiny, "--out", tmp_path / "run", "--set", "lrr=1e-4")
    assert r.returncode == 2 and r.stderr.strip() == "error: --set: unknown key 'lrr' (did you mean 'lr'?)"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 10: plots a person reads


def rl_rows(n=40):
    return [{"step": s, "reward": 0.1 + s / 50, "reward_correct": s / 50, "reward_format": 0.95, "accuracy": s / 50,
             "response_length": 20 + s, "kl": 0.001 * s, **({"test_pass@1": s / 45} if s % 10 == 0 else {})}
            for s in range(1, n + 1)]


def test_run_plots_label_their_axes_and_explain_the_faint_line():
    import matplotlib.pyplot as plt

    for name, title, panels in RL_PLOTS:
        fig = figure(rl_rows(), panels, title, smooth=5)
        axes = fig.get_axes()
        assert all(ax.get_ylabel() for ax in axes), name
        legend = [t.get_text() for ax in axes for t in ax.get_legend().get_texts()]
        assert any(t.endswith("each step") for t in legend) and any("mean of the last 5" in t for t in legend), legend
        colours = [line.get_color() for ax in axes for line in ax.lines if line.get_alpha() is None]
        assert len(set(colours)) == len(colours), name
        if name == "reward.png":  # the correct-answer reward on an axis of its own
            assert [[t.get_text() for t in ax.get_legend().get_texts()][0] for ax in axes][0].startswith("correct")
            assert len(axes[0].lines) == 2
        plt.close(fig)


def test_agreement_plot_has_no_bars_below_zero_and_whole_question_counts():
    import matplotlib.pyplot as plt

    k = 4
    rows = ([{"input_sha256": f"m{i}", "method": "majority", "confidence": (i % 5) / k} for i in range(7)]
            + [{"input_sha256": f"v{i}", "method": "verified", "confidence": (1 + i % 4) / k} for i in range(5)]
            + [{"input_sha256": "u", "method": "unverified", "confidence": 0.0}])
    fig = agreement_figure(rows, k)
    ax = fig.get_axes()[0]
    bars = [b for b in ax.patches if b.get_height() > 0]
    assert min(b.get_x() for b in bars) >= -0.5 and min(ax.get_xticks()) == 0 and ax.get_xlim()[0] >= -0.5
    assert all(float(t).is_integer() for t in ax.get_yticks())
    assert len({tuple(b.get_facecolor()) for b in bars}) == 2  # one colour per group, not blended
    assert sum(b.get_height() for b in bars) == len(rows) and ax.get_ylabel() and ax.get_xlabel()
    plt.close(fig)


# ----------------------------------------------------------------------------- 3: long steps say so


def test_a_long_job_announces_each_phase_off_a_terminal(capsys):
    from keel.runlog import phases

    with phases("export", 3) as begin:  # as `keel export` and `keel parity` drive it
        begin("loading the model")
        begin("tracing it")
    err = capsys.readouterr().err.splitlines()
    assert [re.sub(r"\d+s", "Ns", line) for line in err] == [
        "export: loading the model (1/3, Ns so far)", "export: tracing it (2/3, Ns so far)", "export: done in Ns"]
