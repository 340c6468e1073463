"""The `keel` command: a thin typer layer over the library. No logic lives here."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from keel.errors import KeelError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train reasoning LMs with RL from verifiable rewards; serve them anywhere.")

TASK_HELP = ("arithmetic | countdown | math (-o path=DATA) | a .jsonl/.parquet file, a folder of shards or a "
             "`datasets` save_to_disk folder, with question/answer columns")
OPTION_HELP = "task option KEY=VALUE, repeatable (e.g. -o digits=4, -o question_key=problem)"
SET_HELP = ("set any recipe field, KEY=VALUE, repeatable; dotted for sections (e.g. --set lr=1e-4 "
            "--set resilience.keep=5). Task options are -o")

# The options every training command (sft, rl) takes, declared once; `training_command` adds them.
TRAIN_OPTIONS = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                 for name, annotation, default in (
    ("model", Path, typer.Option(..., help="HF model directory to start from (for rl, usually an SFT model)")),
    ("out", Path, typer.Option(..., help="run folder; the trained model goes to OUT/model")),
    ("recipe", Optional[Path], typer.Option(None, help="YAML with the stage's settings (see recipes/)")),
    ("task", Optional[str], typer.Option(None, help=TASK_HELP)),
    ("option", Optional[list[str]], typer.Option(None, "-o", "--option", help=OPTION_HELP)),
    ("steps", Optional[int], typer.Option(None, help="optimizer steps (sft) or rollout batches (rl)")),
    ("lr", Optional[float], typer.Option(None, help="peak learning rate")),
    ("settings", Optional[list[str]], typer.Option(None, "--set", help=SET_HELP)),
    ("device", Optional[str], typer.Option(None, help="auto | cpu | cuda | npu | xpu | mps")),
    ("seed", Optional[int], typer.Option(None)),
    ("resume", bool, typer.Option(False, help="continue from the newest good checkpoint in OUT (fresh if none)")),
    ("fresh", bool, typer.Option(False, help="start over in an OUT that has checkpoints, deleting them")),
    ("checkpoint_every", Optional[int], typer.Option(None, help="steps between checkpoints")),
    ("max_restarts", int, typer.Option(0, help="restart the run in place this many times if it dies")),
    ("inject", Optional[str], typer.Option(None, help="fault spec, e.g. kill@step=7,nan_grad@step=3 (testing)")),
    ("sync", Optional[str], typer.Option(None, help="under torchrun: ddp (all-reduce gradients every step) | "
                                               "diloco (rare pseudo-gradient syncs) | fsdp (sharded weights "
                                               "and optimizer, FSDP2; --set distributed.offload=true "
                                               "keeps them in host memory)")),
    ("simulate_link", Optional[str], typer.Option(None, help="GBPS[,LATENCY_MS]: report how long this run's "
                                                       "communication would take on such a link")),
    ("report_to", Optional[list[str]], typer.Option(None, help="experiment tracker that gets the metrics too: "
                                                    "tensorboard | wandb | trackio | mlflow (repeatable)")),
)]


def training_command(command):
    """Give a training command the shared TRAIN_OPTIONS (before its own); it receives them as one
    dict, `run`."""
    names = [p.name for p in TRAIN_OPTIONS]

    @functools.wraps(command)
    def with_run(**kwargs):
        return command(run={n: kwargs.pop(n) for n in names}, **kwargs)

    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(command).parameters.values() if p.name != "run"]
    with_run.__signature__ = inspect.Signature(TRAIN_OPTIONS + own)
    return with_run


def _options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KeelError(f"task option {pair!r} is not KEY=VALUE: write e.g. -o digits=4")
        options[key] = yaml.safe_load(value)
    return options


def _settings(pairs: list[str] | None) -> dict:
    """--set KEY=VALUE pairs as a nested dict: "resilience.keep=5" -> {"resilience": {"keep": 5}}."""
    settings: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or "" in key.split("."):
            raise KeelError(f"--set {pair!r} is not KEY=VALUE: write e.g. --set lr=1e-4 or --set resilience.keep=5")
        *sections, name = key.split(".")
        node = settings
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise KeelError(f"--set {pair!r}: {section} is set to a value already")
        node[name] = yaml.safe_load(value)
    return settings


def _stage_config(cls, recipe: Optional[Path], settings: list[str] | None = None, **flags):
    """The recipe (or the defaults), then --set's fields, then the dedicated flags."""
    from keel.config import load_recipe, override, with_settings

    cfg = load_recipe(recipe, cls) if recipe else cls()
    return override(with_settings(cfg, _settings(settings)), **flags)


def _train(cls, train, run: dict, **stage_flags) -> None:
    """Run a training stage (config class `cls`, function `train`) from the command line; with
    --max-restarts in a child process that is restarted (resuming) when it dies."""
    import os

    from keel.config import with_run_options
    from keel.train.stage import check_fresh_start, check_unfinished, interrupted, train_stage

    cfg = _stage_config(cls, run["recipe"], run["settings"], task=run["task"],
                        task_options=_options(run["option"]) or None, steps=run["steps"], lr=run["lr"],
                        device=run["device"], seed=run["seed"],
                        report_to=",".join(run["report_to"]) if run["report_to"] else None, **stage_flags)
    cfg = with_run_options(cfg, resume=run["resume"], checkpoint_every=run["checkpoint_every"],
                           inject=run["inject"], sync=run["sync"], link=run["simulate_link"])
    check_fresh_start(run["out"], run["resume"], run["fresh"])
    try:
        if run["max_restarts"]:
            from keel.resilience.supervise import supervise, without_option

            check_unfinished(run["out"])
            os.environ["KEEL_SUPERVISED"] = "1"  # a Ctrl-C is reported once, here, not by the child too
            sys.exit(supervise(without_option(sys.argv[1:], "--max-restarts"), run["max_restarts"], run["out"]))
        written = train_stage(train, cfg, run["model"], run["out"])
    except KeyboardInterrupt:
        if not os.environ.get("KEEL_SUPERVISED") or run["max_restarts"]:
            typer.echo(interrupted(run["out"], sys.argv[1:]), err=True)
        sys.exit(130)
    if written:
        typer.echo(f"wrote {written}")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="run folder (overwritten)"),
         recipe: Optional[Path] = typer.Option(None, help="a demo recipe (default: the embedded one, recipes/demo.yaml)"),
         device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | npu | xpu | mps"),
         quick: bool = typer.Option(False, help="about half the compute: 200 SFT steps, 50 RL steps, "
                                    "evaluations on 100 questions; accuracy still rises")):
    """Build a small model, SFT it, RL it, evaluate before and after; write a report to OUT."""
    from keel.config import DemoConfig, load_recipe
    from keel.demo import quick as quick_config, run_demo

    cfg = (load_recipe(recipe, DemoConfig) if recipe else DemoConfig()).on_device(device)
    cfg = quick_config(cfg) if quick else cfg
    report = run_demo(cfg, out)
    typer.echo(json.dumps({"sft": {"pass@1": report["sft"]["pass@1"]}, "rl": {"pass@1": report["rl"]["pass@1"]},
                           "wall_s": round(report["wall_s"], 1), "out": str(out)}))


@app.command("init-model")
def init_model_cmd(out: Path = typer.Option(..., help="directory to write the HF model to"),
                   arch: str = typer.Option("qwen3", help="qwen3 | llama"),
                   layers: Optional[int] = typer.Option(None, help="default 4 (a preset fixes it)"),
                   hidden: Optional[int] = typer.Option(None, help="a multiple of 32; default 128 (a preset fixes it)"),
                   seed: int = typer.Option(0),
                   preset: Optional[str] = typer.Option(None, help="a released model's shape at random init: 0.6b "
                                                        "(--arch qwen3: Qwen3-0.6B, with Qwen's vocabulary unless --tokenizer)"),
                   tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory to build around (its "
                                                           "vocabulary, eos/pad and chat template), or qwen: Qwen's "
                                                           "BPE vocabulary from the dashscope package, offline"),
                   overwrite: bool = typer.Option(False, help="replace OUT even when it is not a model keel wrote")):
    """Make a model from scratch: small with a character-level tokenizer built locally (default),
    around a real tokenizer (--tokenizer), or of a released model's shape (--preset)."""
    from keel.models import init_model, save_model

    model, tok = init_model(arch, layers, hidden, seed, preset=preset, tokenizer=tokenizer)
    save_model(model, tok, out, overwrite=overwrite)
    vocabulary = f", a {len(tok)}-token vocabulary" if preset or tokenizer else ""
    typer.echo(f"wrote {out} ({sum(p.numel() for p in model.parameters())} parameters{vocabulary})")


@app.command()
def data(task: str = typer.Option(..., help=TASK_HELP), out: Path = typer.Option(..., help="JSONL file to write (- for stdout)"),
         split: str = typer.Option("train", help="train | test"), n: int = typer.Option(100),
         seed: int = typer.Option(0), option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP)):
    """Write a task's rows (question, answer, trace and task fields) as JSONL."""
    from keel.tasks import get_task
    from keel.tasks.files import write_dataset

    examples = get_task(task, **_options(option)).examples(split, n, seed=seed)
    if str(out) == "-":  # the rows to stdout (for a pipe), the summary to stderr
        sys.stdout.write("".join(json.dumps(ex.to_row()) + "\n" for ex in examples))
        typer.echo(f"wrote {len(examples)} {split} rows to stdout", err=True)
        return
    write_dataset(examples, out)
    typer.echo(f"wrote {len(examples)} {split} rows to {out}")


@app.command("sft")
@training_command
def sft_cmd(examples: Optional[int] = typer.Option(None, help="training traces drawn from the task's train split"),
            batch_tokens: Optional[int] = typer.Option(None, help="tokens per packed batch"),
            run: Optional[dict] = None):
    """Cold-start supervised training on reasoning traces (loss on completions only)."""
    from keel.config import SFTConfig
    from keel.train.sft import sft

    _train(SFTConfig, sft, run, examples=examples, batch_tokens=batch_tokens)


@app.command("rl")
@training_command
def rl_cmd(loss: Optional[str] = typer.Option(None, help="grpo | dr_grpo | dapo | gspo"),
           group_size: Optional[int] = typer.Option(None, help="samples per prompt"),
           prompts_per_step: Optional[int] = typer.Option(None, help="prompts per rollout batch"),
           rollout: Optional[str] = typer.Option(None, help="sample rollouts on another backend, KIND[:DEVICE[:DTYPE]] "
                                                 "as keel parity takes them (e.g. torch:cpu:bf16, onnxruntime:cpu:int8)"),
           correction: Optional[str] = typer.Option(None, help="trainer/sampler mismatch correction: "
                                                    "auto | tis | icepop | seq_mask | none"),
           async_steps: Optional[int] = typer.Option(None, help="1: sample the next step's rollouts while "
                                                     "training on this step's (one step off-policy, corrected)"),
           run: Optional[dict] = None):
    """RL from verifiable rewards with the GRPO family."""
    from keel.config import RLConfig
    from keel.engine.backends import rollout_section
    from keel.rl.trainer import rl

    _train(RLConfig, rl, run, loss=loss, group_size=group_size, prompts_per_step=prompts_per_step,
           rollout=rollout_section(rollout) if rollout else None, correction=correction, async_steps=async_steps)


@app.command("report")
def report_cmd(out: Path = typer.Argument(..., help="a run folder (keel sft/rl/demo --out)"),
               mtbf_hours: Optional[float] = typer.Option(None, help="mean time between failures; default: observed")):
    """Goodput of a run: useful step time against time lost to faults and to checkpointing,
    and the checkpoint interval the Young/Daly rule recommends; per stage the steps' peak memory and
    MB sent per step by purpose, also plotted into OUT/resources_<stage>.png."""
    from keel.report import format_goodput, goodput, plot_resources
    from keel.runlog import console

    g = goodput(out, mtbf_hours)
    for line in format_goodput(g) + [f"plot: {path}" for path in plot_resources(out)]:
        console.print(line, soft_wrap=True)
    typer.echo(json.dumps(g))


@app.command("eval")
def eval_cmd(model: Path = typer.Option(..., help="HF model directory"),
             task: str = typer.Option("arithmetic", help=TASK_HELP),
             option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP),
             recipe: Optional[Path] = typer.Option(None, help="YAML with eval settings"),
             settings: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
             n: Optional[int] = None, k: Optional[int] = None, device: Optional[str] = None, seed: Optional[int] = None):
    """Print JSON with pass@1 (greedy) and pass@k (sampled) on the task's test split."""
    from keel.config import EvalConfig
    from keel.device import pick_device
    from keel.evaluate import evaluate
    from keel.models import load_model

    cfg = _stage_config(EvalConfig, recipe, settings, task=task, task_options=_options(option) or None,
                        n=n, k=k, device=device, seed=seed)
    m, tokenizer = load_model(model, pick_device(cfg.device))
    result = evaluate(m, tokenizer, cfg)
    result.pop("examples")
    typer.echo(json.dumps(result))


label_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                        help="Label questions with the model itself: verified traces, majority votes, review.")
app.add_typer(label_app, name="label")


@label_app.callback(invoke_without_command=True)
def label_cmd(ctx: typer.Context,
              model: Optional[Path] = typer.Option(None, help="HF model directory that writes the traces"),
              questions: Optional[Path] = typer.Option(None, help=".jsonl/.parquet: question, optional answer, other fields kept"),
              out: Optional[Path] = typer.Option(None, help="label file to write, or to resume (.jsonl or .parquet)"),
              k: Optional[int] = typer.Option(None, "-k", help="traces sampled per question (default 8)"),
              task: Optional[str] = typer.Option(None, help="verifier: a task whose reward checks traces (default: compare answers)"),
              option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP),
              recipe: Optional[Path] = typer.Option(None, help="YAML with label settings (LabelConfig)"),
              settings: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
              all_traces: bool = typer.Option(False, "--all-traces", help="a row per distinct accepted trace"),
              threshold: Optional[float] = typer.Option(None, help="flag majority labels with agreement below this (default 0.5)"),
              fmt: Optional[str] = typer.Option(None, "--format", help="jsonl | parquet (default: by --out's suffix)"),
              question_key: Optional[str] = typer.Option(None, help="question column (default: question)"),
              answer_key: Optional[str] = typer.Option(None, help="reference answer column, optional per row (default: answer)"),
              temperature: Optional[float] = None, max_new_tokens: Optional[int] = None,
              batch_questions: Optional[int] = None, device: Optional[str] = None, seed: Optional[int] = None):
    """Sample k traces per question; keep the verified ones, or label by majority vote (`review`: people)."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None or questions is None or out is None:
        raise KeelError("keel label needs --model, --questions and --out (or a subcommand: keel label review)")
    from keel.config import LabelConfig
    from keel.label import label_file

    cfg = _stage_config(LabelConfig, recipe, settings, k=k, task=task, task_options=_options(option) or None,
                        all_traces=all_traces or None, threshold=threshold, temperature=temperature,
                        max_new_tokens=max_new_tokens, batch_questions=batch_questions, device=device, seed=seed,
                        question_key=question_key, answer_key=answer_key)
    typer.echo(json.dumps(label_file(model, questions, out, cfg, fmt)))


@label_app.command("review")
def label_review_cmd(labels: Path = typer.Option(..., "--in", help="a label file written by keel label"),
                     export: Optional[Path] = typer.Option(None, "--export", help="write the flagged questions to this CSV"),
                     import_: Optional[Path] = typer.Option(None, "--import", help="merge the CSV's human_answer column")):
    """Round-trip flagged labels through a spreadsheet: --export, fill in human_answer, --import."""
    from keel.label import export_review, import_review

    if (export is None) == (import_ is None):
        raise KeelError("pass one of --export review.csv or --import review.csv")
    if export is not None:
        typer.echo(f"wrote {export_review(labels, export)} questions to review to {export}")
    else:
        typer.echo(json.dumps(import_review(labels, import_)))


@app.command("expert-iteration")
def expert_iteration_cmd(model: Path = typer.Option(..., help="the (SFT) model that labels and is fine-tuned"),
                         out: Path = typer.Option(..., help="run folder: labels, report.md, OUT/model"),
                         recipe: Optional[Path] = typer.Option(None, help="YAML (see recipes/expert_iteration.yaml)"),
                         questions: Optional[int] = typer.Option(None, help="train questions to label"),
                         device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | npu | xpu | mps")):
    """Label train questions with the model, fine-tune on the accepted traces, report the test gain."""
    from keel.config import ExpertIterationConfig
    from keel.expert import expert_iteration

    cfg = _stage_config(ExpertIterationConfig, recipe, questions=questions)
    report = expert_iteration(cfg, model, out, device=device)
    typer.echo(json.dumps({"before": report["before"]["pass@1"], "after": report["after"]["pass@1"],
                           "gain_pass@1": report["gain_pass@1"], "out": str(out)}))


@app.command("export")
def export_cmd(model: Path = typer.Option(..., help="HF model directory"),
               out: Path = typer.Option(..., help="directory to write the export to (replaces an earlier export)"),
               format: str = typer.Option("onnx", "--format", help="onnx (the HF directory itself is the safetensors format)"),
               dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16 | int8 | int4 (int8/int4: matmul weights "
                                          "quantized by ONNX Runtime's tools, as the rollout sampler runs them)"),
               overwrite: bool = typer.Option(False, help="replace OUT even when it is not an export keel wrote")):
    """Export a model to ONNX with KV-cache inputs/outputs, for ONNX Runtime on any provider."""
    from keel.export.onnx import EXPORT_PHASES, export_onnx
    from keel.runlog import phases

    if format != "onnx":
        raise KeelError(f"unknown --format {format!r}: use onnx (the HF directory already is safetensors)")
    with phases("export", len(EXPORT_PHASES)) as begin:
        meta = export_onnx(model, out, dtype, overwrite=overwrite, on_phase=begin)
    typer.echo(json.dumps({"out": str(out), "dtype": dtype, "opset": meta["opset"],
                           "check_max_abs_logit_diff": meta.get("check_max_abs_logit_diff")}))


@app.command("parity")
def parity_cmd(model: Path = typer.Option(..., help="HF model directory"),
               out: Path = typer.Option(..., help="folder for parity.json (and any ONNX export it needs)"),
               reference: str = typer.Option("torch:cpu:fp32", help="KIND:WHERE:DTYPE, KIND torch | onnxruntime"),
               candidate: list[str] = typer.Option(..., help="backend to check, repeatable (e.g. onnxruntime:cpu:fp32, "
                                                   "onnxruntime:cpu:int8, onnxruntime:cpu:int4, torch:cpu:bf16, "
                                                   "vllm:cpu where vLLM is installed)"),
               recipe: Optional[Path] = typer.Option(None, help="YAML with parity settings and thresholds"),
               task: Optional[str] = typer.Option(None, help=TASK_HELP),
               option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP),
               n: Optional[int] = None, max_new_tokens: Optional[int] = None, batch: Optional[int] = None):
    """Check that candidate backends compute what the reference does; exit 1 when a threshold fails."""
    from keel.config import ParityConfig
    from keel.export.parity import format_table, run_parity

    cfg = _stage_config(ParityConfig, recipe, task=task, task_options=_options(option) or None, n=n,
                        max_new_tokens=max_new_tokens, batch=batch)
    result, fails = run_parity(model, reference, candidate, out, cfg)
    typer.echo(format_table(result))
    for fail in fails:
        typer.echo(f"FAIL {fail}", err=True)
    typer.echo(f"wrote {out / 'parity.json'}")
    if fails:
        sys.exit(1)


@app.command("serve")
def serve_cmd(model: Path = typer.Option(..., help="HF model directory (torch) or `keel export` directory (onnxruntime)"),
              backend: Optional[str] = typer.Option(None, help="torch | onnxruntime | vllm, or a spec as keel parity "
                                                    "takes them (e.g. onnxruntime:cpu:int8: an HF directory is exported in "
                                                    "memory; vllm:cpu where vLLM is installed)"),
              device: Optional[str] = typer.Option(None, help="torch: auto | cpu | cuda | npu | xpu | mps"),
              dtype: Optional[str] = typer.Option(None, help="torch: fp32 | bf16 | fp16"),
              provider: Optional[str] = typer.Option(None, help="onnxruntime: cpu | cuda | cann | openvino | ..."),
              host: Optional[str] = typer.Option(None, help="default 127.0.0.1"), port: Optional[int] = None,
              api_key: Optional[str] = typer.Option(None, help="require this bearer key; prefer setting KEEL_API_KEY "
                                                   "(a flag is visible to every local user in ps)"),
              model_name: Optional[str] = None, max_batch: Optional[int] = None, max_context: Optional[int] = None,
              max_waiting: Optional[int] = None, request_timeout_s: Optional[float] = None,
              recipe: Optional[Path] = typer.Option(None, help="YAML with serve settings")):
    """Serve a model through an OpenAI-compatible API (chat, completions, streaming) with continuous batching."""
    import os

    from keel.config import ServeConfig
    from keel.serve.app import serve

    # KEEL_API_KEY wins over --api-key: a command line is readable by every user of the machine
    # (ps, /proc/PID/cmdline), a process's environment only by its owner.
    if os.environ.get("KEEL_API_KEY"):
        if api_key and api_key != os.environ["KEEL_API_KEY"]:
            typer.echo("warning: both KEEL_API_KEY and --api-key are set; using KEEL_API_KEY", err=True)
        api_key = os.environ["KEEL_API_KEY"]
    elif api_key:
        typer.echo("warning: --api-key shows in ps to every user of this machine; set KEEL_API_KEY instead", err=True)
    cfg = _stage_config(ServeConfig, recipe, backend=backend, device=device, dtype=dtype, provider=provider,
                        host=host, port=port, api_key=api_key, model_name=model_name, max_batch=max_batch,
                        max_context=max_context, max_waiting=max_waiting, request_timeout_s=request_timeout_s)
    serve(model, cfg)


@app.command("chat")
def chat_cmd(model: Path = typer.Option(..., help="HF model directory (torch) or `keel export` directory (onnxruntime)"),
             backend: str = typer.Option("torch", help="torch | onnxruntime"),
             device: str = typer.Option("auto"), dtype: str = typer.Option("fp32"),
             provider: str = typer.Option("cpu"), max_tokens: int = typer.Option(256),
             temperature: float = typer.Option(0.7), seed: int = typer.Option(0)):
    """Chat with a model in the terminal; tokens stream as they are sampled."""
    from keel.serve.chat import chat
    from keel.engine.sampler import SamplingParams
    from keel.engine.backends import load_backend

    SamplingParams(temperature, 1.0, max_tokens)  # bad flags fail before the model loads
    if backend.partition(":")[0] == "vllm":  # chat steps keel's engine, which a vLLM sampler is not
        raise KeelError("keel chat runs torch or onnxruntime, not vllm: chat on one of those, or serve the model "
                        "on vLLM (keel serve --backend vllm:cpu)", field="backend")
    b, tokenizer = load_backend(model, backend, device, dtype, provider)
    chat(b, tokenizer, max_tokens=max_tokens, temperature=temperature, seed=seed)


def _flag_hint(field: str | None, argv: list[str]) -> str:
    """" (--flag)" for the config field `field` where the invoked command has a flag for
    it (a task option: -o KEY=VALUE), else "". The library names fields; only the CLI knows flags."""
    if not field:
        return ""
    command = typer.main.get_command(app)
    for arg in argv:
        sub = getattr(command, "commands", {}).get(arg)  # typer may vendor click: no isinstance
        if sub is None and not arg.startswith("-"):
            break
        command = sub or command
    flags = {p.name: [o for o in p.opts if o.startswith("--")] for p in command.params}
    group, _, key = field.rpartition(".")
    if group == "task_options" and "option" in flags:
        return f" (-o {key}=VALUE)"
    if flags.get(field):
        return f" ({flags[field][0]})"
    return f" (--set {field}=VALUE)" if "settings" in flags and _recipe_has(command.name, field) else ""


def _recipe_has(command: str, field: str) -> bool:
    """Whether `field` is a field of the config that command `command`'s --set sets."""
    from keel import config

    cls = {"sft": config.SFTConfig, "rl": config.RLConfig, "eval": config.EvalConfig, "label": config.LabelConfig}
    return command in cls and config.has_field(cls[command], field)


def main() -> None:
    from keel.device import share_cpus  # first: it sets OpenMP's wait policy before torch loads

    share_cpus()
    try:
        rc = app(standalone_mode=False)  # non-standalone click returns a typer.Exit's code
    except KeelError as e:
        typer.echo(f"error: {e}{_flag_hint(e.field, sys.argv[1:])}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:
        # Usage errors (unknown command or option) arrive here in non-standalone mode; typer may
        # vendor its own click, so recognise them by shape rather than by class.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
