"""lm-evaluation-harness against `keel serve`: its `local-completions` model on two tiny offline
tasks (tests/data/lm_eval: a generate_until task and a multiple_choice one, which lm-eval scores
by loglikelihood through echo + logprobs). Asserts lm-eval finishes and reports each metric, and
that the loglikelihood choices it made are the ones the model's own log-probs pick."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keel.config import ServeConfig
from keel.models import init_model
from keel.serve.app import background_server, create_app, make_served
from keel.engine.backends import TorchBackend

pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_lm_eval_local_completions_runs_against_keel_serve(tmp_path):
    model, tok = init_model("llama", layers=1, hidden=32, seed=0)
    tok.save_pretrained(tmp_path / "tok")
    cfg = ServeConfig(max_batch=8)
    served = make_served(TorchBackend(model.eval(), "cpu"), tok, cfg, "tiny")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused"}
    with background_server(create_app(served, cfg)) as url:
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
               f"tokenizer={tmp_path / 'tok'},num_concurrent=1,max_retries=1",
               "--tasks", "keel_tiny_gen,keel_tiny_mc", "--include_path", str(ROOT / "tests/data/lm_eval"),
               "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["keel_tiny_gen"]["exact_match,none"] <= 1.0
    acc = results["keel_tiny_mc"]["acc,none"]
    # the accuracy lm-eval reports is the one the model's own log-probs give
    docs = [json.loads(line) for line in (ROOT / "tests/data/lm_eval/tiny.jsonl").read_text().splitlines()]
    right = 0
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ctx = tok.encode(d["question"], add_special_tokens=False)
            full = tok.encode(d["question"] + " " + choice, add_special_tokens=False)
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
            scores.append(sum(float(lp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
        right += max(range(len(scores)), key=scores.__getitem__) == d["label"]
    assert acc == pytest.approx(right / len(docs))
