"""Load and save any Hugging Face causal LM; build one at random init, with its tokenizer, offline:
small with keel's character-level tokenizer (the demo's), around a real tokenizer (an HF
directory, or Qwen's vocabulary from keel.vocab), or of a released model's shape (PRESETS).

Models are swappable commodities: keel talks to them only through `AutoModelForCausalLM` and
`AutoTokenizer`, and every model it writes is a plain HF directory (config.json, safetensors,
tokenizer) that transformers loads without keel.
"""

from __future__ import annotations

import copy
import json
import shutil
import string
import warnings
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
MODEL_KIND = "model"  # the marker keel.io puts in the HF directories keel writes


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


# Real model shapes `init_model(preset=...)` builds at random init: the architecture's config
# fields as the released model's config.json has them (Qwen/Qwen3-0.6B: 596,049,920 parameters
# with the embedding tied to the LM head).
PRESETS = {
    "qwen3": {
        "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, vocab_size=151_936, max_position_embeddings=40_960,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     sliding_window=None, max_window_layers=28),
    },
}
QWEN = "qwen"  # tokenizer=QWEN: Qwen's BPE vocabulary shipped in dashscope (keel.vocab.qwen_tokenizer)


def load_tokenizer(path: str | Path):
    """The tokenizer of an HF tokenizer (or model) directory, offline; KeelError (field
    "tokenizer") when there is none or it has no eos token."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise KeelError(f"{path} holds no tokenizer (tokenizer.json or tokenizer_config.json): pass an HF "
                        f"tokenizer directory, or {QWEN!r} for Qwen's vocabulary (pip install dashscope)",
                        field="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise KeelError(f"could not load the tokenizer in {path}: {str(e).splitlines()[0]}", field="tokenizer") from e
    if tokenizer.eos_token_id is None:
        raise KeelError(f"the tokenizer in {path} has no eos_token: set one in its tokenizer_config.json",
                        field="tokenizer")
    return tokenizer


def pick_tokenizer(tokenizer=None, preset: str | None = None):
    """`tokenizer` as a tokenizer object: None -> keel's character-level one (Qwen's vocabulary
    for a preset, which needs a real one); QWEN -> Qwen's from dashscope; a path -> the HF
    tokenizer directory there (an existing directory wins over the name QWEN); an object -> itself."""
    if tokenizer is None:
        tokenizer = QWEN if preset else None
        if tokenizer is None:
            return build_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        if str(tokenizer) == QWEN and not Path(tokenizer).is_dir():
            from keel.vocab import qwen_tokenizer

            return qwen_tokenizer()
        return load_tokenizer(tokenizer)
    return tokenizer


def vocab_extent(tokenizer) -> int:
    """One past the largest token id: the embedding rows a model needs for `tokenizer`."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def model_config(arch: str = "qwen3", layers: int | None = None, hidden: int | None = None,
                 max_positions: int | None = None, *, preset: str | None = None, tokenizer=None):
    """The HF config of the model `init_model` builds, allocating nothing (build it on
    torch.device("meta") to count parameters). `tokenizer` is a tokenizer object (its vocabulary
    sizes the embedding; its eos and pad ids are the config's); see `init_model` for the rest."""
    if arch not in ARCHS:
        raise KeelError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}", field="arch")
    import transformers

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KeelError("the tokenizer has no eos_token: set one in its tokenizer_config.json", field="tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    vocab = vocab_extent(tokenizer)
    if preset is not None:
        shapes = PRESETS.get(arch, {})
        if preset not in shapes:
            known = ", ".join(f"{a} {p}" for a, ps in PRESETS.items() for p in ps)
            raise KeelError(f"unknown preset {preset!r} for arch {arch}: choose one of {known}", field="preset")
        for name, value in (("layers", layers), ("hidden", hidden)):
            if value is not None:
                raise KeelError(f"preset {preset} fixes the model's shape: leave {name} unset", field=name)
        shape = dict(shapes[preset])
        if vocab > shape["vocab_size"]:
            raise KeelError(f"the tokenizer has {vocab} tokens, more than preset {preset}'s embedding "
                            f"({shape['vocab_size']} rows): use a tokenizer of that model family", field="tokenizer")
        if max_positions is not None:
            shape["max_position_embeddings"] = max_positions
    else:
        layers = 4 if layers is None else layers
        hidden = 128 if hidden is None else hidden
        if layers < 1 or hidden < 32 or hidden % 32:
            raise KeelError(f"layers must be >= 1 and hidden a multiple of 32 (got {layers}, {hidden})",
                            field="layers" if layers < 1 else "hidden")
        heads = hidden // 32
        shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, head_dim=32,
                     max_position_embeddings=512 if max_positions is None else max_positions,
                     tie_word_embeddings=True)
    return getattr(transformers, ARCHS[arch])(**shape, pad_token_id=pad, eos_token_id=eos, bos_token_id=None)


def init_model(arch: str = "qwen3", layers: int | None = None, hidden: int | None = None, seed: int = 0,
               max_positions: int | None = None, *, preset: str | None = None, tokenizer=None):
    """A randomly initialised causal LM of a real HF architecture, and its tokenizer.

    By default a small one (`layers` 4, `hidden` 128, 512 positions) with keel's character-level
    tokenizer. `tokenizer`: an HF tokenizer directory (or object) to build around instead; its
    vocabulary sizes the embedding, its eos/pad become the config's, its chat template is kept;
    QWEN ("qwen") for Qwen's BPE vocabulary, read offline from the dashscope package.
    `preset`: a released model's shape (PRESETS, e.g. "0.6b" for qwen3: Qwen3-0.6B), which fixes
    layers and hidden; without a tokenizer it gets Qwen's vocabulary (KeelError saying how to
    install it when dashscope is missing)."""
    if arch not in ARCHS:
        raise KeelError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}", field="arch")
    if preset is not None:
        model_config(arch, layers, hidden, max_positions, preset=preset)  # a bad shape fails before any tokenizer loads
    elif tokenizer is not None:
        model_config(arch, layers, hidden, max_positions)
    tokenizer = pick_tokenizer(tokenizer, preset)
    config = model_config(arch, layers, hidden, max_positions, preset=preset, tokenizer=tokenizer)
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


def _reason(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype=torch.float32):
    """Load an HF causal LM directory (safetensors only) and its tokenizer. A folder that is
    broken anywhere (config.json not a config, a field of the wrong type, a truncated weights file,
    an unreadable tokenizer) gives a KeelError naming the file: the folder is input, so whatever a
    library raises on it is the folder's fault, not keel's."""
    from safetensors import safe_open

    path = check_model_dir(path)
    config_file = path / "config.json"
    try:
        if not isinstance(json.loads(config_file.read_text(encoding="utf-8")), dict):
            raise ValueError("it is not a JSON object")
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise KeelError(f"{config_file} is not a valid model config ({_reason(e)}): fix or replace it") from e
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt") as f:
                f.keys()
        except Exception as e:
            raise KeelError(f"{weights} is not a readable safetensors file ({_reason(e)}): it may be truncated; "
                            "copy or save it again") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise KeelError(f"could not load the tokenizer in {path} ({_reason(e)}): fix or replace its tokenizer "
                        "files", field="tokenizer") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True)
        eager_if_soft_capped(model)
    except Exception as e:
        raise KeelError(f"could not build the model in {path} from its config.json and weights ({_reason(e)})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def save_model(model, tokenizer, out: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """Write `out` as an HF directory, atomically: a reader sees the old directory or the new
    one, never half of one. An existing `out` is replaced only when it is a model keel wrote, or
    with `overwrite`; never when it is (or holds) one of `inputs` (keel.io.check_out_folder)."""
    out = Path(out)
    tmp = temp_folder(out, MODEL_KIND, overwrite, inputs)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, out, MODEL_KIND, overwrite, inputs)
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


def sliding_window(config) -> int | None:
    """The attention window of a model with sliding-window layers, else None (configs with
    `layer_types` say per layer whether it is used)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window if isinstance(window, int) and window > 0 else None


# Whether packing is exact, per model_type, as tests/unit/test_sft.py measures it with
# `packing_probe` on every family listed here: transformers turns restarting positions into a
# block-diagonal mask for models built on its masking utilities (RoPE, GPT-2's learned positions,
# Mistral's sliding window), but OPT derives its learned positions from the attention mask.
PACKS_EXACTLY = {"qwen3": True, "qwen2": True, "llama": True, "mistral": True, "gpt2": True, "opt": False}


def packs_exactly(model, longest: int = 64) -> bool:
    """Whether `model` computes on a packed row (sequences end to end, position ids restarting at
    each, no attention mask) exactly what it computes on each sequence alone: the one place keel
    decides which models pack. Known families come from PACKS_EXACTLY; any other architecture is
    measured on the model itself (`packing_probe`)."""
    known = PACKS_EXACTLY.get(getattr(model.config, "model_type", None))
    return known if known is not None else packing_probe(model, longest)


@torch.no_grad()
def packing_probe(model, longest: int = 64, seed: int = 0) -> bool:
    """Two random sequences (the second past the sliding window, when the model has one shorter
    than `longest`) go through `model` packed and alone, in eval mode: True when their logits
    agree to float rounding."""
    config = model.config
    window = sliding_window(config)
    second = 11 if window is None or window + 2 > longest - 5 else window + 2
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    seqs = [torch.randint(0, vocab, (1, n), generator=g).to(device) for n in (5, second)]
    was_training = model.training
    model.eval()
    try:
        alone = [model(input_ids=s, use_cache=False).logits.float() for s in seqs]
        positions = torch.cat([torch.arange(s.shape[1], device=device) for s in seqs])[None]
        packed = model(input_ids=torch.cat(seqs, dim=1), position_ids=positions, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    reference = torch.cat(alone, dim=1)
    return bool((packed - reference).abs().max() <= 1e-3 * (1 + reference.abs().max()))


CHECKPOINTING_PARAMS = 100_000_000  # `gradient_checkpointing: null` turns it on from this model size


def enable_gradient_checkpointing(model, setting: bool | None = True) -> bool:
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (transformers' own checkpointing, non-reentrant): activation memory falls from one copy per
    layer to about one layer's, for roughly a third more compute. `setting` None decides by size:
    on from CHECKPOINTING_PARAMS parameters, where a 16k-token micro-batch's activations outweigh
    the weights (every released reasoning model; none of the demo's). Returns whether it is on."""
    if setting is None:
        setting = sum(p.numel() for p in model.parameters()) >= CHECKPOINTING_PARAMS
        if setting and not getattr(model, "supports_gradient_checkpointing", False):
            return False  # a size default, not the user's ask: train without it
    if not setting:
        return False
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise KeelError(f"{type(model).__name__} does not support gradient checkpointing; set it to false",
                        field="gradient_checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


# ----------------------------------------------------------------------------- LoRA (peft)


def with_lora(model, spec, seed: int):
    """(peft wrapper or None, the transformers model inside it, adapters included): `model` wrapped
    in adapters per `spec` unless it is wrapped already (or `spec` is None and it is not). Under
    LoRA torch's global RNG is seeded here: adapter dropout draws from it, and the checkpoint
    carries it from then on."""
    if spec is not None and not is_lora(model):
        model = add_lora(model, spec, seed)
    if not is_lora(model):
        return None, model
    torch.manual_seed(seed)
    return model, lora_base(model)


def add_lora(model, spec, seed: int = 0):
    """`model` with LoRA adapters of `spec` (a config.LoraSpec) on its linear layers, as a peft
    PeftModel: every base weight frozen, only the adapters trainable. The adapters' A matrices are
    drawn from a generator seeded with `seed` (B starts at zero, so the wrapped model computes
    what `model` did); the global RNG is left where it was. peft injects the adapters into
    `model`'s own modules: `lora_base(wrapped)` is `model`, now adapted."""
    from peft import LoraConfig, get_peft_model

    if is_lora(model):
        raise KeelError("the model already has LoRA adapters: pass the base model, or leave lora unset", field="lora")
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft asks transformers for the pre-5.x `is_gradient_checkpointing`, which warns.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as e:  # target modules not found, unsupported layer types
            raise KeelError(f"lora: {str(e).splitlines()[0]}: check target_modules against the model's "
                            "module names", field="lora.target_modules") from e
    return wrapped


def is_lora(model) -> bool:
    """Whether `model` is a peft model (keel's LoRA wrapper from `add_lora`)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft not installed: nothing can be wrapped
        return False
    return isinstance(model, PeftModel)


def lora_base(model):
    """The transformers model inside a peft model, adapters included (peft injects them into its
    modules): a plain HF class, so the engine, the scorer and torch.compile see what they know."""
    return model.get_base_model() if is_lora(model) else model


def save_adapter(model, out: str | Path) -> Path:
    """Write the LoRA adapters of peft `model` to `out` in peft's format (adapter_config.json,
    adapter_model.safetensors), atomically; `PeftModel.from_pretrained(base, out)` loads them."""
    out = Path(out)
    tmp = temp_folder(out, "adapter")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        publish_folder(tmp, out, "adapter")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merge_lora(model):
    """The plain transformers model with peft `model`'s adapters merged into its weights
    (W + alpha / r * B @ A) and the adapter layers removed, in place: transformers loads what
    `save_model` then writes, without peft."""
    return model.merge_and_unload(safe_merge=True)


def merged_copy(model):
    """A plain transformers copy of peft `model` with its adapters merged in (`merge_lora` on a
    deep copy): `model` is not touched."""
    return merge_lora(copy.deepcopy(model))


class LoraMerge:
    """Calls turn the full weights of a model with LoRA adapters (peft's, injected by `add_lora`)
    into the weights of the plain model `merged_copy` makes: each adapted layer's weight plus its
    active adapters' deltas, computed by peft (`get_delta_weight`: alpha / r * B @ A), under the
    base model's own names, the adapter tensors left out. The weights are a state dict, so they
    may be a sharded model's gathered `full_state`: the deltas are computed on copies of the model's
    LoRA layers without their base layers (adapter-sized), taken here, before any sharding, and
    handed each call's adapter tensors; the model itself is never touched."""

    def __init__(self, model):
        from peft.tuners.lora import LoraLayer

        self.layers = {name: copy.deepcopy(layer, {id(layer.base_layer): torch.nn.Identity()})
                       for name, layer in lora_base(model).named_modules() if isinstance(layer, LoraLayer)}

    @torch.no_grad()
    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        merged = dict(state)
        for name, layer in self.layers.items():
            prefix, base = f"{name}.", f"{name}.base_layer."
            own = {key: merged.pop(key) for key in [k for k in merged if k.startswith(prefix)]}
            layer.load_state_dict({k[len(prefix):]: v for k, v in own.items() if not k.startswith(base)})
            merged.update({prefix + k[len(base):]: v for k, v in own.items() if k.startswith(base)})
            for adapter in layer.active_adapters:
                merged[f"{name}.weight"] = merged[f"{name}.weight"] + layer.get_delta_weight(adapter)
        return merged


def eager_if_soft_capped(model) -> None:
    """Switch `model` to eager attention if it soft-caps attention scores (Gemma 2's
    attn_logit_softcapping) but runs SDPA, which has no cap: transformers before 5.20 loads Gemma 2
    with SDPA and silently drops the cap (later versions load it eager and raise on SDPA)."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "attn_logit_softcapping", None) is not None and config._attn_implementation == "sdpa":
        model.set_attn_implementation("eager")
