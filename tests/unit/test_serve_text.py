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
