import pytest
import torch

from keel.config import SFTConfig
from keel.models import init_model
from keel.train.sft import sft


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A 2-layer Qwen3 SFT'd on bare 2-digit answers just enough that sampled rewards vary (the
    greedy answers are well formed, samples at temperature 1 are only sometimes): the rollout
    backend tests' start. Module-scoped: tests copy it before training it."""
    torch.set_num_threads(1)
    model, tokenizer = init_model("qwen3", layers=2, hidden=64, seed=0)
    sft(model, tokenizer, SFTConfig(task_options={"digits": 2}, examples=400, steps=40, batch_tokens=1024,
                                    drop_thinking=1.0), tmp_path_factory.mktemp("sft"))
    return model, tokenizer
