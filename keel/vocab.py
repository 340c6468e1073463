"""Real BPE vocabularies without a download: tiktoken rank files that PyPI packages ship, turned
into Hugging Face fast tokenizers.

`qwen_tokenizer()` reads Qwen's `qwen.tiktoken` from the `dashscope` package (151,643 byte-level
BPE ranks; the ids are Qwen2's and Qwen3's) and adds Qwen3's special tokens and a Qwen3-style chat
template, so a model built around it speaks Qwen's ids and template. `<think>` and `</think>` are
ordinary text here (several byte-level tokens each), not added tokens.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from keel.errors import KeelError

# Qwen's pre-tokenizer split (dashscope's PAT_STR, the regex of Qwen2's tokenizer.json): single
# digits, letters with one leading non-letter, punctuation runs, newlines, other whitespace.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen3's added tokens from id 151643 on, in order; True where Qwen3 marks the token special
# (dropped by decode(skip_special_tokens=True)). Qwen3's <think> (151667) and </think> (151668)
# are left out on purpose: keel reads the R1 tags as text.
QWEN_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
              ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
              ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
              ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
              ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
              ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
              ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
              ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False)]
QWEN_FIRST_ADDED_ID = 151643
QWEN_EOS, QWEN_PAD = "<|im_end|>", "<|endoftext|>"
# Qwen3's turn format without its tool and reasoning branches: each message between <|im_start|>ROLE
# and <|im_end|>, then the assistant's header when a reply is wanted. The reply ends with
# <|im_end|> (the eos token), as SFT appends it.
QWEN_CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_RANKS = "resources/qwen.tiktoken"  # inside the dashscope package


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """A tiktoken rank file (one `base64(token) rank` per line) as {token bytes: rank}."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_level_bpe(ranks: dict[bytes, int], pattern: str) -> Tokenizer:
    """A tokenizers byte-level BPE that encodes as tiktoken does with `ranks` and `pattern`: the
    vocabulary is the ranks (bytes as GPT-2's printable characters); a merge is listed for every
    split of a token into two tokens, ordered by the merged token's rank, so BPE always joins the
    adjacent pair whose union ranks lowest, as tiktoken does (transformers' TikTokenConverter
    builds the same merges, but needs the tiktoken package to read the file)."""
    printable = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(printable[x] for x in b)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(rank, left, right) for left, right in splits]
    merges.sort(key=lambda m: m[0])
    tok = Tokenizer(models.BPE(vocab, [(text(a), text(b)) for _, a, b in merges], fuse_unk=False,
                               ignore_merges=True))  # a whole piece in the vocabulary is one token, as in tiktoken
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of every byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def qwen_ranks_path() -> Path:
    """Where dashscope's copy of qwen.tiktoken lies (the package is located, not imported)."""
    spec = importlib.util.find_spec("dashscope")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / QWEN_RANKS if spec else None
    if path is None or not path.is_file():
        raise KeelError("Qwen's vocabulary ships in the dashscope package, which is not installed: "
                        "pip install dashscope (or pip install -e '.[test]'), or pass a tokenizer "
                        "directory instead", field="tokenizer")
    return path


@functools.lru_cache(maxsize=1)
def _qwen_bpe(path: str) -> Tokenizer:
    tok = byte_level_bpe(read_tiktoken(path), QWEN_PATTERN)
    tok.normalizer = normalizers.NFC()  # as Qwen2/Qwen3's tokenizer.json and dashscope's encoder
    first = tok.get_vocab_size()
    if first != QWEN_FIRST_ADDED_ID:
        raise KeelError(f"{path} has {first} ranks, not Qwen's {QWEN_FIRST_ADDED_ID}: "
                        "reinstall dashscope", field="tokenizer")
    for content, special in QWEN_ADDED:  # one at a time, in order, so each gets its Qwen id
        token = AddedToken(content, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok  # never handed out: PreTrainedTokenizerFast deep-copies it


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2/Qwen3's byte-level BPE (151,643 ranks + Qwen3's added tokens from 151643), with
    eos <|im_end|>, pad <|endoftext|> and a Qwen3-style chat template; from dashscope's
    qwen.tiktoken, offline. KeelError (field "tokenizer") when dashscope is not installed.
    The conversion takes about 2 s once per process; each call returns a fresh copy (about 1 s)."""
    hf = PreTrainedTokenizerFast(tokenizer_object=_qwen_bpe(str(qwen_ranks_path())),
                                 eos_token=QWEN_EOS, pad_token=QWEN_PAD)
    hf.chat_template = QWEN_CHAT_TEMPLATE
    return hf
