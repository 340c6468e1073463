"""Load and save any Hugging Face causal LM; build a small one, with its tokenizer, offline.

Models are swappable commodities: keel talks to them only through `AutoModelForCausalLM` and
`AutoTokenizer`, and every model it writes is a plain HF directory (config.json, safetensors,
tokenizer) that transformers loads without keel.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from keel.errors import KeelError
from keel.io import publish_folder, temp_folder

PAD, EOS, UNK = "<|pad|>", "<|eos|>", "<|unk|>"
# R1 tags are single tokens: a character-level model then spends its capacity on the reasoning,
# not on spelling "</think>".
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
# keel's own models take the question as one line and answer on the next; `render_prompt` applies
# the same template to any model that has one.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}" + EOS + "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
)

# keel draws its own progress bars; transformers' per-file bars would interleave with them.
hf_logging.disable_progress_bar()

ARCHS = {"qwen3": "Qwen3Config", "llama": "LlamaConfig"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII and newline, plus the R1 tags, built with
    the tokenizers library (no download). Unknown characters map to <|unk|>."""
    chars = [PAD, EOS, UNK] + list(string.printable[:95]) + ["\n"]
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in TAGS])
    tok.add_special_tokens([PAD, EOS, UNK])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def init_model(arch: str = "qwen3", layers: int = 4, hidden: int = 128, seed: int = 0,
               max_positions: int = 512):
    """A small randomly initialised causal LM of a real HF architecture, and its tokenizer."""
    if arch not in ARCHS:
        raise KeelError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}", field="arch")
    if layers < 1 or hidden < 32 or hidden % 32:
        raise KeelError(f"layers must be >= 1 and hidden a multiple of 32 (got {layers}, {hidden})",
                        field="layers" if layers < 1 else "hidden")
    tokenizer = build_tokenizer()
    import transformers

    heads = hidden // 32
    config = getattr(transformers, ARCHS[arch])(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=32,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    hint = "pass a Hugging Face model directory, or make one with `keel init-model --out DIR`"
    if not path.is_dir():
        raise KeelError(f"model directory {path} does not exist: {hint}")
    if not (path / "config.json").is_file():
        raise KeelError(f"{path} has no config.json, so it is not a model directory: {hint}")
    if not any(path.glob("*.safetensors")):
        raise KeelError(f"{path} has no *.safetensors weights (keel never unpickles .bin files): "
                        "convert the weights to safetensors")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise KeelError(f"{path} has no tokenizer: save the tokenizer beside the weights")
    return path


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype=torch.float32):
    """Load an HF causal LM directory (safetensors only) and its tokenizer."""
    path = check_model_dir(path)
    try:
        AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise KeelError(f"could not load the model in {path}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Write `out` as an HF directory, atomically: a reader sees the old directory or the new
    one, never half of one."""
    out = Path(out)
    tmp = temp_folder(out)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id) for the rollout engine."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KeelError("the tokenizer has no eos_token: set one in tokenizer_config.json")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return eos, pad


def render_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of a one-turn prompt ready for the assistant's reply, through the model's chat
    template (keel's own: the question and a newline)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = question + "\n"
    return tokenizer.encode(text, add_special_tokens=False)
