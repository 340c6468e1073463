"""From one question's k sampled traces to its label; pure and deterministic.

- Votes are counted on a canonical key (`vote_key`): numbers by exact value ("1,000", "1000.0"
  and "1000" vote together; "0.5" and "1/2" too), other answers without whitespace, case or `$`.
  Symbolically equal spellings ("x+1", "1+x") vote apart.
- A tie goes to the answer whose first vote came earliest in sample order, and is flagged.
- The best trace of a question is, among its accepted traces, R1-formatted ones first, then the
  one whose tokens the model was surest of (highest mean log-prob), the earliest sample on a tie.
  Shortest-correct would favour bare guesses ("<think></think><answer>42</answer>") over working.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from keel.label.questions import Question
from keel.tasks import Example, get_task
from keel.tasks.verify import answers_match, extract_answer, format_reward, parse_number

# verified: a sample the verifier accepted; unverified: a reference answer no sample reached (flagged,
# no trace); majority: the vote of the samples; human: set in review.
METHODS = ("verified", "unverified", "majority", "human")
NOT_VERIFIED = "no sample verified"  # flag_reason of an unverified row


def vote_key(answer: str | None) -> str | None:
    """Canonical form of an extracted answer for counting votes; None for no answer. Numbers become
    their exact value ("1,000" -> "1000", "0.50" -> "1/2"), other text loses whitespace, case,
    `$` and a trailing full stop."""
    if not isinstance(answer, str) or not answer.strip():
        return None
    number = parse_number(answer)
    if number is not None:
        return str(number)
    key = "".join(answer.replace("$", "").split()).lower().rstrip(".")
    return key or None


@dataclass(frozen=True)
class Vote:
    answer: str | None        # the winning vote_key; None when no sample had an answer
    votes: int                # samples that gave it
    samples: int              # k: every sample counts, answered or not
    members: tuple[int, ...]  # indices of the samples that gave it, in order
    tie: bool                 # another answer had as many votes

    @property
    def confidence(self) -> float:
        return self.votes / self.samples if self.samples else 0.0


def majority_vote(answers: list[str | None]) -> Vote:
    """Majority over the canonical keys of `answers`; ties go to the answer whose first vote is
    earliest. confidence = votes / len(answers)."""
    keys = [vote_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return Vote(None, 0, len(answers), (), False)
    top = max(counts.values())
    winners = [k for k in dict.fromkeys(keys) if k is not None and counts[k] == top]  # first-seen order
    winner = winners[0]
    return Vote(winner, top, len(answers), tuple(i for i, k in enumerate(keys) if k == winner), len(winners) > 1)


def flag_reason(vote: Vote, threshold: float) -> str | None:
    """Why a majority label needs a person: "no answer", "tie", "low agreement" (confidence below
    `threshold`); None when it does not."""
    if vote.answer is None:
        return "no answer"
    if vote.tie:
        return "tie"
    if vote.confidence < threshold:
        return "low agreement"
    return None


def rank_traces(indices, texts: list[str], mean_logps: list[float]) -> list[int]:
    """`indices` best first: R1 format before none, then higher mean token log-prob; ties keep
    sample order (the sort is stable)."""
    return sorted(indices, key=lambda i: (-format_reward(texts[i]), -mean_logps[i]))


@dataclass(frozen=True)
class Label:
    method: str                # verified | unverified | majority
    answer: str | None         # the label; None when nothing was answered
    traces: list[str]          # distinct accepted traces, best first
    confidence: float          # share of the k samples accepted
    accepted: int              # samples accepted (correct, or voting with the majority)
    flag: str | None           # why a person should look, or None


Verifier = Callable[[str, Question], bool]


def make_verifier(task: str | None = None, options: dict | None = None) -> Verifier:
    """`verify(trace, question)`: the task's reward says correct (countdown checks the expression
    against the row's numbers and target); without a task, the extracted answer matches the
    reference as a number, symbolically or as text. Never raises."""
    if task is None:
        return lambda text, q: answers_match(extract_answer(text), q.reference)
    t = get_task(task, **(options or {}))

    def verify(text: str, q: Question) -> bool:
        try:
            return t.reward(text, Example(q.question, q.reference, meta=q.extra))["correct"] == 1
        except Exception:  # a task's reward must not take labelling down
            return False
    return verify


def decide(q: Question, texts: list[str], mean_logps: list[float], verify: Verifier, threshold: float) -> Label:
    """Label one question from its k sampled `texts` (and their mean token log-probs): with a
    reference, the traces `verify` accepts ("unverified" and flagged when it accepts none); without
    one, the majority vote of their answers."""
    k = len(texts)
    if q.reference is not None:
        accepted = [i for i, t in enumerate(texts) if verify(t, q)]
        # A reference with no accepted sample is not "verified": the row keeps the answer (RL can use
        # it) but has no trace, and goes to review.
        method, answer = ("verified" if accepted else "unverified"), q.reference
        flag = None if accepted else NOT_VERIFIED
    else:
        vote = majority_vote([extract_answer(t) for t in texts])
        accepted, method, flag = list(vote.members), "majority", flag_reason(vote, threshold)
        answer = None
    ranked = rank_traces(accepted, texts, mean_logps)
    if method == "majority" and ranked:
        answer = extract_answer(texts[ranked[0]]).strip()  # the label as the best trace spells it
    traces = list(dict.fromkeys(texts[i] for i in ranked))
    return Label(method, answer, traces, len(accepted) / k if k else 0.0, len(accepted), flag)
