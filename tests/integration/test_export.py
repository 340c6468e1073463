"""ONNX export round trip (prefill and decode logits equal torch's), the onnxruntime backend in the
batching engine and the server, and `keel parity` with its thresholds and exit status."""

import json

import openai
import pytest
import torch

from keel.config import ServeConfig
from keel.errors import KeelError
from keel.models import init_model, render_prompt, save_model, special_ids
from keel.engine.sampler import SamplingParams
from keel.serve.app import background_server, create_app, load_served
from keel.engine.backends import OrtBackend, load_torch_backend
from keel.engine.batching import generate
from keel.export.onnx import check_export
from tests.run_cli import keel


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model and a parity run against it, which exports the ONNX graph as it goes."""
    from keel.config import ParityConfig
    from keel.export.parity import run_parity

    root = tmp_path_factory.mktemp("export")
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=1)
    save_model(model, tok, root / "model")
    cfg = ParityConfig(n=6, max_new_tokens=8, batch=4)
    result, fails = run_parity(root / "model", "torch:cpu:fp32",
                               ["onnxruntime:cpu:fp32", "torch:cpu:bf16", "onnxruntime:cpu:int8"], root / "parity", cfg)
    return root, result, fails


def test_export_round_trip_prefill_and_decode(exported):
    root, _, _ = exported
    onnx_dir = root / "parity" / "onnx-fp32"
    meta = json.loads((onnx_dir / "keel_onnx.json").read_text())
    assert meta["dtype"] == "fp32" and meta["layers"] == 2 and meta["check_max_abs_logit_diff"] < 1e-4
    ort = OrtBackend(onnx_dir)
    ref, tok = load_torch_backend(root / "model", "cpu")
    assert check_export(ref, ort, prompt_len=11, seed=5) < 1e-4
    # the graph takes any batch and cache length, left padding included: greedy tokens through the
    # batching engine equal torch's
    eos, _ = special_ids(tok)
    prompts = [render_prompt(tok, q) for q in ["1+1", "345+678", "a much longer question here"]]
    greedy = SamplingParams(0.0, 1.0, 10)
    a = generate(ref, prompts, greedy, eos_id=eos, max_batch=3)
    b = generate(ort, prompts, greedy, eos_id=eos, max_batch=3)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert torch.allclose(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-4)


def test_parity_json_and_table(exported, capsys):
    root, result, fails = exported
    from keel.export.parity import format_table

    saved = json.loads((root / "parity" / "parity.json").read_text())
    assert saved["candidates"].keys() == {"onnxruntime:cpu:fp32", "torch:cpu:bf16", "onnxruntime:cpu:int8"}
    ort = saved["candidates"]["onnxruntime:cpu:fp32"]
    assert ort["greedy_match"] == 1.0 and ort["max_abs_logit_delta"] < 1e-4 and ort["topk_containment"] == 1.0
    bf16 = saved["candidates"]["torch:cpu:bf16"]
    assert 1e-4 < bf16["max_abs_logit_delta"] < 1.0  # bf16 really is a different computation
    # the int8 rollout sampler's graph: the report states the mismatch it would bring to RL
    int8 = saved["candidates"]["onnxruntime:cpu:int8"]
    assert 1e-3 < int8["max_abs_logit_delta"] < 1.0 and 0 <= int8["greedy_match"] <= 1
    assert fails == [] and saved["failed"] == []
    table = format_table(result)
    assert "onnxruntime:cpu:fp32" in table and "100.0%" in table


def test_parity_cli_fails_a_threshold_with_exit_1_and_reuses_the_export(exported, tmp_path, monkeypatch, capsys):
    root, _, _ = exported
    onnx = root / "parity" / "onnx-fp32" / "model.onnx"
    built = onnx.stat().st_mtime
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("max_logit_delta_same_dtype: 0.0\n")
    code, out, err = keel(monkeypatch, capsys, "parity", "--model", root / "model", "--out", root / "parity",
                          "--candidate", "onnxruntime:cpu:fp32", "--recipe", recipe, "--n", 3,
                          "--max-new-tokens", 4)
    assert code == 1, (out, err)
    assert "FAIL onnxruntime:cpu:fp32: max |delta logit|" in err and "greedy match" in out
    assert onnx.stat().st_mtime == built  # the export of the same weights was reused


def test_cli_bad_input_is_one_line_exit_2(exported, monkeypatch, capsys):
    root, _, _ = exported
    code, _, err = keel(monkeypatch, capsys, "export", "--model", root / "model", "--out", root / "x", "--format", "tflite")
    assert code == 2 and err.startswith("error: unknown --format 'tflite'") and not (root / "x").exists()
    code, _, err = keel(monkeypatch, capsys, "parity", "--model", root / "model", "--out", root / "p2",
                        "--candidate", "tensorflow:cpu")
    assert code == 2 and "backend spec 'tensorflow:cpu'" in err
    code, _, err = keel(monkeypatch, capsys, "serve", "--model", root / "parity" / "onnx-fp32",
                        "--backend", "onnxruntime", "--provider", "cann")
    assert code == 2 and "provider 'cann' is not available" in err


def test_server_on_the_onnxruntime_backend(exported):
    root, _, _ = exported
    cfg = ServeConfig(backend="onnxruntime", provider="cpu", model_name="tiny-onnx")
    served = load_served(root / "parity" / "onnx-fp32", cfg)
    torch_served = load_served(root / "model", ServeConfig(device="cpu", model_name="tiny-onnx"))
    texts = []
    for s in (served, torch_served):
        with background_server(create_app(s, cfg)) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
            texts.append(c.completions.create(model="tiny-onnx", prompt="12+34\n", max_tokens=6, temperature=0)
                         .choices[0].text)
    assert served.backend.name == "onnxruntime:cpu:fp32" and texts[0] == texts[1]


def test_serve_takes_parity_specs(exported):
    """`keel serve --backend onnxruntime:cpu:int8` over the int8 export parity made, and over the HF
    directory (exported in memory into the same graph): the same greedy tokens."""
    root, _, _ = exported
    int8_dir = root / "parity" / "onnx-int8"
    assert json.loads((int8_dir / "keel_onnx.json").read_text())["dtype"] == "int8"
    spec = ServeConfig(backend="onnxruntime:cpu:int8", model_name="tiny")
    from_export, from_hf = load_served(int8_dir, spec), load_served(root / "model", spec)
    assert from_export.backend.name == from_hf.backend.name == "onnxruntime:cpu:int8"
    eos, _ = special_ids(from_hf.tokenizer)
    prompts = [render_prompt(from_hf.tokenizer, q) for q in ["12+34", "999+1"]]
    runs = [generate(s.backend, prompts, SamplingParams(0.0, 1.0, 8), eos_id=eos) for s in (from_export, from_hf)]
    assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]]
    with pytest.raises(KeelError, match="holds a int8 ONNX graph, not int4"):
        load_served(int8_dir, ServeConfig(backend="onnxruntime:cpu:int4"))
