"""Label questions with the model itself: verifier-checked rejection sampling, majority votes,
a review queue for people, and provenance on every row.

For each question k traces are sampled. With a reference answer the verifier keeps the correct
ones (rejection sampling, as R1's SFT data was made): the label is the reference, `confidence` the
share of correct samples. Without one, the extracted answers vote (self-consistency): the label is
the winner, `confidence` its share of the k votes, and low agreement, ties and unanswered questions
are flagged for review. With `all_traces` each distinct accepted trace is written, best first, one
row each.

Resume: every row carries `input_sha256`, a hash of everything that decides it. A run started
again with the same arguments skips the questions whose hash is already written, after cutting off
a line torn by a kill.

Modules: `questions` (the input file), `votes` (pure: vote key, majority, best trace, one
question's label), `provenance` (hashes, seeds, the rows), `journal` (the output files, append
and recover), `run` (`label_file`, summary, plot), `review` (the CSV round trip for people).
"""

from keel.label.journal import LabelFiles, append_rows, read_rows, recover, write_rows
from keel.label.provenance import (
    chunk_seed,
    input_hash,
    job_spec,
    make_rows,
    model_fingerprint,
    sampling_fields,
    utc_now,
)
from keel.label.questions import Question, read_questions
from keel.label.review import REVIEW_COLUMNS, apply_human, export_review, import_review, read_review
from keel.label.run import label_file, per_question, plot_agreement, summarize
from keel.label.votes import (
    METHODS,
    Label,
    Verifier,
    Vote,
    decide,
    flag_reason,
    majority_vote,
    make_verifier,
    rank_traces,
    vote_key,
)

__all__ = [
    "METHODS", "REVIEW_COLUMNS", "Label", "LabelFiles", "Question", "Verifier", "Vote",
    "append_rows", "apply_human", "chunk_seed", "decide", "export_review", "flag_reason", "import_review",
    "input_hash", "job_spec", "label_file", "majority_vote", "make_rows", "make_verifier", "model_fingerprint",
    "per_question", "plot_agreement", "rank_traces", "read_questions", "read_review", "read_rows", "recover",
    "sampling_fields", "summarize", "utc_now", "vote_key", "write_rows",
]
