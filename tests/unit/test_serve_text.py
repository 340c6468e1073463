"""Token ids to client text: stop strings, think-tag split, and deltas that add up to the whole."""

import pytest

from keel.models import build_tokenizer
from keel.serve.text import TextStream, held_suffix, cut_at_stop, render_chat, split_reasoning


@pytest.mark.parametrize("text, in_think, final, expected", [
    ("<think>a+b</think><answer>3</answer>", False, True, ("a+b", "<answer>3</answer>")),
    ("  <think>x</think>\n  hi", False, True, ("x", "hi")),
    ("<think>unfinished", False, True, ("unfinished", "")),
    ("<think>x</thi", False, False, ("x", "")),          # a tag may be forming: hold it back
    ("<think>x</thi", False, True, ("x</thi", "")),       # at the end it is just text
    ("no tags here", False, True, (None, "no tags here")),
    ("<thi", False, False, (None, "")),
    ("plan</think>42", True, True, ("plan", "42")),       # the prompt opened the think block
])
def test_split_reasoning(text, in_think, final, expected):
    assert split_reasoning(text, in_think, final) == expected


def test_cut_at_stop_andheld_suffix_suffix():
    assert cut_at_stop("12+9=21\nnext", ["\n", "=2"]) == ("12+9", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)
    assert held_suffix("answer: EN", ["END"]) == 2
    assert held_suffix("answer", ["END"]) == 0
    assert held_suffix("x</thi", ["</think>"]) == 5


def test_stream_deltas_add_up_and_stop_strings_are_cut():
    tok = build_tokenizer()
    ids = tok.encode("<think>1+2=3</think><answer>3</answer>STOP more", add_special_tokens=False)
    stream = TextStream(tok, stop=["STOP"])
    reasoning, content, stopped_at = "", "", None
    for n in range(1, len(ids) + 1):
        d_r, d_c, stopped = stream.push(ids[:n])
        reasoning, content = reasoning + d_r, content + d_c
        assert "S" not in content  # "S" might begin "STOP": never sent early
        if stopped:
            stopped_at = n
            break
    assert (reasoning, content) == ("1+2=3", "<answer>3</answer>")
    assert tok.decode(ids[:stopped_at]).endswith("STOP")


def test_stream_without_reasoning_split_and_final_flush():
    tok = build_tokenizer()
    ids = tok.encode("<think>a</think>b", add_special_tokens=False)
    stream = TextStream(tok, reasoning=False)
    assert "".join(stream.push(ids[:n])[1] for n in range(1, len(ids) + 1)) == "<think>a</think>b"
    assert stream.push(ids, final=True) == ("", "", False)


def test_render_chat_uses_keel_template():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2"}]
    assert render_chat(tok, msgs) == "1+1\n2<|eos|>2+2\n"


class CountingTokenizer:
    """The real tokenizer, counting the token ids it is asked to decode: the work a stream does."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kw)


@pytest.mark.parametrize("stop", [[], ["never", "x" * 128, "END!", "<answer>?"]])
def test_streaming_work_per_token_is_bounded(stop):
    """Each token used to re-decode the whole output (n^2 / 2 ids decoded for n tokens) and
    rescan it for every stop string; now a window of a few tokens is decoded per token."""
    tok = build_tokenizer()
    ids = tok.encode("<think>" + "12+34=46, " * 200 + "</think><answer>46</answer>", add_special_tokens=False)
    counting = CountingTokenizer(tok)
    stream = TextStream(counting, stop=stop)
    pieces = [stream.push(ids[:n]) for n in range(1, len(ids) + 1)] + [stream.push(ids, final=True)]
    assert len(ids) > 2000 and counting.decoded <= 4 * len(ids)
    reasoning, content = "".join(p[0] for p in pieces), "".join(p[1] for p in pieces)
    assert (reasoning, content) == ("12+34=46, " * 200, "<answer>46</answer>")  # the same text as one decode


def test_stop_string_split_across_tokens_is_found_once_complete():
    tok = build_tokenizer()
    ids = tok.encode("abc END! more", add_special_tokens=False)
    stream = TextStream(tok, stop=["END!"], reasoning=False)
    sent = ""
    for n in range(1, len(ids) + 1):
        _, d_c, stopped = stream.push(ids[:n])
        sent += d_c
        if stopped:
            break
    assert stopped and sent == "abc " and n == len("abc END!")


def test_stop_strings_are_bounded_in_count_and_length():
    from pydantic import ValidationError

    from keel.serve.schemas import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    ChatCompletionRequest.model_validate({**body, "stop": ["a" * 128] * 4})
    for stop in ("a" * 129, ["a"] * 5, ["a", "b" * 129]):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**body, "stop": stop})
