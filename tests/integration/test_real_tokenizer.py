"""The whole pipeline on a real BPE vocabulary, offline: Qwen's qwen.tiktoken (shipped in the
dashscope package) converted by keel.vocab, checked token for token against tiktoken itself, then
a 1-layer model built around it by `keel init-model --tokenizer qwen` goes through data, sft, rl,
eval, label, ONNX export + parity and serve, and each stage's output loads in plain transformers."""

import json
import random
import sys

import openai
import pytest
import tiktoken
from transformers import AutoModelForCausalLM, AutoTokenizer

from keel.config import EvalConfig, LabelConfig, ParityConfig, ServeConfig
from keel.evaluate import evaluate
from keel.export.parity import run_parity
from keel.label import LabelFiles, label_file, read_rows
from keel.models import load_model, render_prompt, special_ids
from keel.serve.app import background_server, create_app, load_served
from keel.vocab import QWEN_PATTERN, qwen_ranks_path, qwen_tokenizer, read_tiktoken

pytestmark = pytest.mark.usefixtures("one_thread")

# Qwen3's ids for its turn markers; the rank file's last id is 151642.
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


def keel(*args) -> str:
    """Run the `keel` command in this process (a subprocess would re-import torch and redo the
    vocabulary conversion each time); its stdout."""
    import contextlib
    import io

    from keel.cli import main

    out, argv = io.StringIO(), sys.argv
    sys.argv = ["keel", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = argv
    assert e.value.code == 0, (args, out.getvalue())
    return out.getvalue()


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


def test_conversion_encodes_as_tiktoken_does(tok):
    """Same ids as tiktoken with Qwen's ranks and split pattern (what dashscope and Qwen encode)
    on text that exercises digits, CJK, emoji, whitespace runs and byte fallbacks; decode inverts."""
    reference = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=read_tiktoken(qwen_ranks_path()),
                                  special_tokens={})
    rng = random.Random(0)
    alphabet = "abcxyz THE 0123456789 .,!?'\"\n\t-_=+()[]{}<>/\\中文测试éüß🤖🎉"
    texts = ["Hello world! 12+9=21", "What's 1234567 * 89? I'll say they're", "  two\n\n\tthen tabs\r\n",
             "中文测试：你好，世界。", "naïve café 🤖🎉", "def f(x):\n    return x**2  # c\n", "a" * 300, "\x00\x7fÿ"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode_ordinary(text), text
        assert tok.decode(ids) == text
    assert tok.encode("12345", add_special_tokens=False) == [16, 17, 18, 19, 20]  # Qwen splits digits one by one


def test_special_tokens_template_and_think_tags(tok):
    assert len(tok) == 151_667 and special_ids(tok) == (IM_END, ENDOFTEXT)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</tool_response>"]) == \
        [ENDOFTEXT, IM_START, IM_END, 151_666]
    text = tok.decode(render_prompt(tok, "12+9"))
    assert text == "<|im_start|>user\n12+9<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "12+9")[0] == IM_START  # the markers are single tokens, not spelled out
    # <think> is ordinary text: several BPE tokens, none of them added, and it survives a decode
    # that drops special tokens (the rewards read it there)
    for tag in ("<think>", "</think>"):
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) > 1 and max(ids) < ENDOFTEXT and tok.decode(ids, skip_special_tokens=True) == tag
    trace = "<think>12+9=21</think><answer>21</answer>"
    assert tok.decode(tok.encode(trace, add_special_tokens=False) + [IM_END], skip_special_tokens=True) == trace


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, one_thread):
    """init-model -> data -> sft (3 steps) -> rl (2 steps), all through the CLI."""
    root = tmp_path_factory.mktemp("qwen")
    printed = keel("init-model", "--tokenizer", "qwen", "--layers", 1, "--hidden", 64, "--out", root / "init")
    assert "151667-token vocabulary" in printed
    keel("data", "--task", "arithmetic", "--n", 24, "--out", root / "train.jsonl", "-o", "digits=1")
    (root / "sft.yaml").write_text("examples: 24\nbatch_tokens: 256\nwarmup: 1\nlr: 0.01\n")
    keel("sft", "--model", root / "init", "--out", root / "sft", "--task", root / "train.jsonl", "--steps", 3,
         "--recipe", root / "sft.yaml", "--device", "cpu")
    # beta > 0: every row trains (a random model's rewards are all 0, and rows of zero advantage
    # are skipped without a KL term), so the entropy below is measured on every rollout
    (root / "rl.yaml").write_text("prompts_per_step: 2\ngroup_size: 2\nmax_new_tokens: 12\nbeta: 0.01\n")
    keel("rl", "--model", root / "sft" / "model", "--out", root / "rl", "--steps", 2, "--recipe", root / "rl.yaml",
         "-o", "digits=1", "--device", "cpu")
    return root


def test_trained_models_load_in_plain_transformers(pipeline):
    for stage in ("init", "sft/model", "rl/model"):
        path = pipeline / stage
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.vocab_size == 151_667 and model.config.eos_token_id == IM_END
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
        prompt = tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False, add_generation_prompt=True)
        assert prompt == "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
    sft_log = [json.loads(line) for line in (pipeline / "sft" / "metrics.jsonl").read_text().splitlines()]
    rl_log = [json.loads(line) for line in (pipeline / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in sft_log if "loss" in r]) == 3 and sft_log[-1]["loss"] < sft_log[0]["loss"]
    assert [r["step"] for r in rl_log] == [1, 2] and all(r["response_length"] <= 12 for r in rl_log)
    # the rollouts sample over the whole real vocabulary: a near-uniform 1-layer model's entropy is
    # close to ln(151,667) = 11.93 nats (a model sized for a smaller vocabulary could not get there)
    assert all(11.0 < r["entropy"] < 11.94 for r in rl_log), rl_log


def test_eval_and_label(pipeline, tmp_path):
    model, tok = load_model(pipeline / "rl" / "model")
    result = evaluate(model, tok, EvalConfig(task_options={"digits": 1}, n=4, k=2, max_new_tokens=12, device="cpu"))
    examples = result.pop("examples")
    assert result.keys() >= {"pass@1", "pass@2", "format"} and result["n"] == 4
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if k != "n"), result
    # three SFT steps on traces were enough to teach the BPE spelling of the opening tag (<th ink >),
    # and the outputs come back as text with it (special tokens dropped, ordinary ones kept)
    assert len(examples) == 4 and all(e["output"].startswith("<think>") for e in examples), examples
    rows = [json.loads(line) for line in (pipeline / "train.jsonl").read_text().splitlines()[:3]]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                              for r in rows))
    summary = label_file(pipeline / "rl" / "model", tmp_path / "q.jsonl", tmp_path / "labels.jsonl",
                         LabelConfig(k=2, max_new_tokens=12, batch_questions=3, device="cpu"))
    assert summary["questions"] == 3 and 0.0 <= summary["accept_rate"] <= 1.0, summary
    files = LabelFiles.at(tmp_path / "labels.jsonl")
    labelled = read_rows(files.out) + read_rows(files.unlabelled)
    assert sorted(r["question"] for r in labelled) == sorted(r["question"] for r in rows)


def test_onnx_parity_and_serve(pipeline):
    model_dir = pipeline / "rl" / "model"
    result, fails = run_parity(model_dir, "torch:cpu:fp32", ["onnxruntime:cpu:fp32"], pipeline / "parity",
                               ParityConfig(task_options={"digits": 1}, n=3, max_new_tokens=8, batch=3))
    ort = result["candidates"]["onnxruntime:cpu:fp32"]
    assert not fails and ort["greedy_match"] == 1.0 and ort["max_abs_logit_delta"] < 1e-3, (fails, ort)
    exported = AutoTokenizer.from_pretrained(pipeline / "parity" / "onnx-fp32")  # the tokenizer rides along
    assert exported.eos_token_id == IM_END and exported.chat_template

    cfg = ServeConfig(max_batch=2, default_max_tokens=8)
    with background_server(create_app(load_served(model_dir, cfg), cfg)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "1+1"}],
                                           max_tokens=8, temperature=0)
    reply = r.choices[0].message
    # the prompt went through the Qwen template: <|im_start|> user \n 1 + 1 <|im_end|> \n <|im_start|> assistant \n
    assert isinstance(reply.content, str) and r.usage.prompt_tokens == 11
    assert 1 <= r.usage.completion_tokens <= 8
