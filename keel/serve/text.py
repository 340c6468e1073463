"""Text in and out of the model, shared by `keel serve` and `keel chat`: the chat template that
turns messages into a prompt, and from generated token ids to the text a client sees
(incremental decoding, stop strings, and the split of R1-style output into `reasoning_content`,
between think tags, and `content`).

Each token costs a bounded amount of tokenizer work: only a window of the last few tokens is
decoded (vLLM's incremental detokenizer: the text of tokens [prefix, end) minus that of
[prefix, read)), and a stop string is looked for only where it could newly end (the new text and
the longest stop's length before it). Only the new suffix of the visible text is sent, so a
stream's deltas always add up to the non-streamed answer. Text that might still turn into a stop
string or a think tag is held back until the next token decides.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def held_suffix(text: str, tags: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def split_reasoning(text: str, in_think: bool = False, final: bool = True) -> tuple[str | None, str]:
    """(reasoning or None, content) of a completion. Reasoning is the text between a leading
    <think> (or the start, when the prompt already opened the think block: `in_think`) and
    </think>; content is what follows, without leading whitespace. While not `final`, a possible
    partial tag at the end is held back."""
    s = text if in_think else text.lstrip()
    if not in_think and s.startswith(THINK_OPEN):
        s, in_think = s[len(THINK_OPEN):], True
    if in_think:
        reasoning, sep, content = s.partition(THINK_CLOSE)
        if not sep:
            return (reasoning if final else reasoning[:len(reasoning) - held_suffix(reasoning, [THINK_CLOSE])]), ""
        return reasoning, content.lstrip()
    if not final and s and THINK_OPEN.startswith(s):
        return None, ""
    return None, s


def cut_at_stop(text: str, stop: list[str], since: int = 0) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded), and whether one was found. Matches are
    looked for from `since` on (a caller that already checked the text before may skip it)."""
    hits = [i for i in (text.find(s, since) for s in stop if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class TextStream:
    """Feeds on the growing token list of one completion; returns (reasoning delta, content
    delta, stopped) each time. `stopped` means a stop string appeared: end the request."""

    def __init__(self, tokenizer, stop: list[str] | None = None, in_think: bool = False, reasoning: bool = True):
        self.tokenizer, self.stop, self.in_think, self.reasoning = tokenizer, [s for s in stop or [] if s], in_think, reasoning
        self.sent_reasoning, self.sent_content = "", ""
        self.text = ""                  # the decoded output so far, cut at a stop string once one appeared
        self._prefix = self._read = 0   # token offsets of the decode window
        self._longest_stop = max(map(len, self.stop), default=0)

    def _new_text(self, token_ids: list[int], final: bool) -> str:
        """The text the tokens since the last call add, from decoding a window of a few tokens."""
        n = len(token_ids)
        prefix_text = self.tokenizer.decode(token_ids[self._prefix:self._read], skip_special_tokens=True)
        text = self.tokenizer.decode(token_ids[self._prefix:n], skip_special_tokens=True)
        if len(text) <= len(prefix_text):  # only skipped (special) tokens: nothing to show yet
            if text == prefix_text:
                self._read = n
            return ""
        if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        self._prefix, self._read = self._read, n
        return text[len(prefix_text):]

    def push(self, token_ids: list[int], final: bool = False) -> tuple[str, str, bool]:
        """The deltas `token_ids` (the whole output so far, one token longer than last time, or the
        same with `final`) add."""
        checked = len(self.text)
        self.text += self._new_text(token_ids, final)
        # a stop string found now ends in the new text: it starts at most its length before it
        self.text, stopped = cut_at_stop(self.text, self.stop, max(0, checked - self._longest_stop + 1))
        text = self.text
        final = final or stopped
        if not final:
            text = text[:len(text) - held_suffix(text, self.stop)]
        if self.reasoning:
            reasoning, content = split_reasoning(text, self.in_think, final)
        else:
            reasoning, content = None, text
        d_reasoning = _delta(self.sent_reasoning, reasoning or "")
        d_content = _delta(self.sent_content, content)
        self.sent_reasoning += d_reasoning
        self.sent_content += d_content
        return d_reasoning, d_content, stopped


def _delta(sent: str, now: str) -> str:
    """The new suffix of `now`; text already sent is never taken back."""
    return now[len(sent):] if now.startswith(sent) else ""


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text for `messages` ({"role", "content"} dicts) through the model's chat template,
    or keel's own (question, newline; the model answers in R1 format) when it has none."""
    from keel.errors import KeelError
    from keel.models import CHAT_TEMPLATE

    try:
        return tokenizer.apply_chat_template(messages, chat_template=tokenizer.chat_template or CHAT_TEMPLATE,
                                             tokenize=False, add_generation_prompt=True)
    except Exception as e:  # templates raise on message orders they do not support
        raise KeelError(f"the chat template rejected these messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
