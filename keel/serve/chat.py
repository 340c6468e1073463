"""`keel chat`: talk to a model in the terminal, tokens streamed as they are sampled.

Owns the terminal loop (commands, history, the context budget) and how a reply is printed. It
runs the serving engine in-process (no server): the same backends, template, sampler, stop rules
and reasoning split as `keel serve`. Type /reset to start over, /exit (or Ctrl-D) to leave; Ctrl-C
stops the reply being written and returns to the prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from keel.errors import KeelError
from keel.engine.sampler import SamplingParams
from keel.engine.batching import Engine, Request
from keel.serve.text import THINK_OPEN, TextStream, render_chat

HELP = "type a message; /reset starts over, /exit leaves; Ctrl-C stops a reply"


def chat(backend, tokenizer, *, max_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0,
         seed: int = 0, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> int:
    """The chat loop; returns the number of replies given. `read` raises EOFError at the end of input."""
    from keel.models import special_ids

    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    eos, _ = special_ids(tokenizer)
    engine = Engine(backend, eos_id=eos, max_batch=1)
    generator = torch.Generator(device=backend.device).manual_seed(seed)
    messages: list[dict] = []
    replies = 0
    write(f"{backend.name}, context {backend.max_context} tokens; {HELP}\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return replies
        except KeyboardInterrupt:  # as in Python's own prompt: Ctrl-C clears the line, Ctrl-D leaves
            write("\n(/exit or Ctrl-D leaves)\n")
            continue
        if line.strip() in ("/exit", "/quit"):
            return replies
        if line.strip() == "/reset":
            messages.clear()
            write("(new conversation)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            text = render_chat(tokenizer, messages)
        except KeelError as e:
            messages.pop()
            write(f"error: {e}\n")
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        budget = min(max_tokens, backend.max_context - len(ids))
        if budget < 1:
            messages.pop()
            write("error: the conversation no longer fits the context; /reset to start over\n")
            continue
        stream = TextStream(tokenizer, in_think=text.rstrip().endswith(THINK_OPEN))
        show = _ReplyPrinter(write)

        def on_token(req: Request, token: int) -> None:
            d_r, d_c, _ = stream.push(req.tokens)
            show(d_r, d_c)

        req = Request(ids, SamplingParams(temperature, top_p, budget), generator, on_token=on_token)
        try:
            engine.submit(req)
            engine.run_until_idle()
            d_r, d_c, _ = stream.push(req.tokens, final=True)
            show(d_r, d_c)
            write("\n")
        except KeyboardInterrupt:
            # Ctrl-C stops this reply, not the chat: what was shown stays in the history. The engine
            # may have been interrupted mid-step, so the next reply gets a new one (it holds no weights).
            write(" (stopped)\n")
            engine = Engine(backend, eos_id=eos, max_batch=1)
        messages.append({"role": "assistant", "content": stream.sent_content})
        replies += 1


class _ReplyPrinter:
    """Writes one reply's deltas as they come: reasoning after a "(thinking) " mark, then the
    answer on a line of its own, so the two can be told apart without colours."""

    def __init__(self, write: Callable[[str], None]):
        self.write = write
        self.thinking = False    # the "(thinking) " mark is out
        self.answering = False   # the newline between reasoning and answer is out

    def __call__(self, d_reasoning: str, d_content: str) -> None:
        if d_reasoning:
            if not self.thinking:
                self.write("(thinking) ")
                self.thinking = True
            self.write(d_reasoning)
        if d_content:
            if self.thinking and not self.answering:
                self.write("\n")
                self.answering = True
            self.write(d_content)
