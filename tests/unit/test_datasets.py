"""Datasets as users hold them: `save_to_disk` folders (Dataset and DatasetDict), folders of Parquet
shards, JSONL files; column mapping; GSM8K and MATH answer conventions; the `math` preset."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from keel.errors import KeelError
from keel.tasks import get_task
from keel.tasks.base import is_test
from keel.tasks.files import FileTask, MathTask, last_boxed, worked_answer


def gsm_rows(n, start=0):
    return [{"question": f"Q{i}: what is {i}+{i}?", "answer": f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(start, start + n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def questions(examples):
    return [e.question for e in examples]


def test_save_to_disk_dataset_splits_by_hash_stably_and_disjointly(tmp_path):
    rows = gsm_rows(300)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    task = get_task(str(tmp_path / "ds"))
    assert isinstance(task, FileTask) and task.splits_from == "hash"
    n_test = sum(is_test(r["question"]) for r in rows)
    train, test = task.examples("train", 300 - n_test), task.examples("test", n_test)
    assert not set(questions(train)) & set(questions(test))
    assert set(questions(train)) | set(questions(test)) == {r["question"] for r in rows}
    assert all(is_test(q) for q in questions(test))  # the same hash as the built-in tasks: stable anywhere
    assert get_task(str(tmp_path / "ds")).examples("train", 50) == task.examples("train", 50)  # deterministic
    assert task.examples("train", 50, seed=1) != task.examples("train", 50)
    ex = next(e for e in train if e.question.startswith("Q7:"))
    assert ex.answer == "14" and ex.trace == "<think>7+7 = 14</think><answer>14</answer>"  # calculator notes gone


def test_dataset_dict_keeps_its_own_train_and_test(tmp_path):
    train_rows, test_rows = gsm_rows(40), gsm_rows(10, start=35)  # Q35..Q39 are in both
    DatasetDict(train=Dataset.from_list(train_rows), test=Dataset.from_list(test_rows)).save_to_disk(str(tmp_path / "dd"))
    task = get_task(str(tmp_path / "dd"))
    assert task.splits_from == "train/test"
    train, test = task.examples("train", 35), task.examples("test", 10)
    assert sorted(questions(test)) == sorted(r["question"] for r in test_rows)
    assert sorted(questions(train)) == sorted(r["question"] for r in train_rows[:35])  # overlap dropped from train
    with pytest.raises(KeelError, match="at most 35"):
        task.examples("train", 36)
    # test_fraction divides one table: with splits of its own the dataset says which one
    with pytest.raises(KeelError, match="test_fraction.*splits train, test.*option split") as e:
        get_task(str(tmp_path / "dd"), test_fraction=0.5)
    assert e.value.field == "task_options.split"
    one = get_task(str(tmp_path / "dd"), split="train", test_fraction=0.5)
    assert one.splits_from == "hash"
    assert sorted(questions(one._splits["train"] + one._splits["test"])) == sorted(r["question"] for r in train_rows)
    with pytest.raises(KeelError, match="no split 'dev'.*train, test"):
        get_task(str(tmp_path / "dd"), split="dev")


def test_dataset_dict_validation_is_the_test_split_and_unknown_layouts_ask(tmp_path):
    DatasetDict(train=Dataset.from_list(gsm_rows(20)), validation=Dataset.from_list(gsm_rows(5, start=20))
                ).save_to_disk(str(tmp_path / "tv"))
    task = get_task(str(tmp_path / "tv"))
    assert task.splits_from == "train/validation" and len(task.examples("test", 5)) == 5
    DatasetDict(a=Dataset.from_list(gsm_rows(5)), b=Dataset.from_list(gsm_rows(5, start=5))).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(KeelError, match="splits a, b: name the one .* split=a"):
        get_task(str(tmp_path / "ab"))
    assert len(get_task(str(tmp_path / "ab"), split="b", test_fraction=0.0).examples("train", 5)) == 5


def test_parquet_shards_are_read_together(tmp_path):
    rows = gsm_rows(90)
    (tmp_path / "shards").mkdir()
    for k in range(3):  # shard names that say no split: one table
        pq.write_table(pa.Table.from_pylist(rows[30 * k:30 * (k + 1)]), tmp_path / "shards" / f"part-{k}.parquet")
    (tmp_path / "shards" / "README.md").write_text("not data")
    task = get_task(str(tmp_path / "shards"), test_fraction=0.0)
    assert sorted(questions(task.examples("train", 90))) == sorted(r["question"] for r in rows)


def test_parquet_shards_named_as_on_the_hub_keep_their_splits(tmp_path):
    main = tmp_path / "gsm8k" / "main"
    main.mkdir(parents=True)
    rows = gsm_rows(50)
    pq.write_table(pa.Table.from_pylist(rows[:20]), main / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[20:40]), main / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[40:]), main / "test-00000-of-00001.parquet")
    task = get_task(str(tmp_path / "gsm8k"))
    assert task.splits_from == "train/test"
    assert sorted(questions(task.examples("train", 40))) == sorted(r["question"] for r in rows[:40])
    assert sorted(questions(task.examples("test", 10))) == sorted(r["question"] for r in rows[40:])


def test_column_mapping_in_every_format(tmp_path):
    rows = [{"problem": f"what is {i} squared?", "final": str(i * i), "id": i} for i in range(30)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "data.parquet")
    for path in ("d.jsonl", "ds", "pq"):
        task = get_task(str(tmp_path / path), question_key="problem", answer_key="final", test_fraction=0.0)
        ex = next(e for e in task.examples("train", 30) if e.question == "what is 7 squared?")
        assert ex.answer == "49" and ex.trace is None  # a bare answer has no working to learn from
        assert task.reward("<think>7*7</think><answer>49</answer>", ex) == {"format": 1.0, "correct": 1.0}
        with pytest.raises(KeelError) as e:
            get_task(str(tmp_path / path), question_key="prompt", answer_key="final")
        msg = str(e.value)
        assert "'prompt'" in msg and "columns: problem, final, id" in msg and "question_key" in msg, msg
        assert e.value.field == "task_options.question_key"


def test_gsm8k_answers_with_thousands_separators(tmp_path):
    rows = [{"question": "How many?", "answer": "10 * 123.4 = <<10*123.4=1234>>1,234 items\n#### 1,234"}]
    task = get_task(str(write_jsonl(tmp_path / "d.jsonl", rows)), test_fraction=0.0)
    [ex] = task.examples("train", 1)
    assert ex.answer == "1,234"
    assert ex.trace == "<think>10 * 123.4 = 1,234 items</think><answer>1,234</answer>"
    for said, right in (("1234", 1.0), ("1,234", 1.0), ("1235", 0.0), ("1.234", 0.0)):
        assert task.reward(f"<think>.</think><answer>{said}</answer>", ex)["correct"] == right, said


@pytest.mark.parametrize("text, boxed", [
    (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"First \boxed{3}, then at last \boxed{\left\{ 1, \sqrt{2} \right\}}", r"\left\{ 1, \sqrt{2} \right\}"),
    (r"\boxed{\begin{pmatrix} 1 \\ \frac{2}{3} \end{pmatrix}}", r"\begin{pmatrix} 1 \\ \frac{2}{3} \end{pmatrix}"),
    (r"the answer is \fbox{7}", "7"),
    (r"never closed \boxed{\frac{1}{2}", None),
    ("no box at all: 12", None),
])
def test_last_boxed_keeps_nested_braces(text, boxed):
    assert last_boxed(text) == boxed


def test_worked_answer_conventions():
    assert worked_answer("2 + 2 = <<2+2=4>>4\n#### 4") == ("4", "2 + 2 = 4")
    assert worked_answer("#### 4") == ("4", None)
    assert worked_answer(r"We get $\boxed{\frac12}$.") == (r"\frac12", r"We get $\boxed{\frac12}$.")
    assert worked_answer(r"\boxed{5}") == ("5", None)
    assert worked_answer(" 42 ") == ("42", None)


MATH_ROWS = [
    {"problem": "Compute $\\frac{2}{4}$.", "solution": "Divide both by 2: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
     "level": "Level 1"},
    {"problem": "Find the set of roots of $x^2 = 2$.",
     "solution": "Taking roots, $x = \\pm\\sqrt{2}$, so the set is $\\boxed{\\{-\\sqrt{2}, \\sqrt{2}\\}}$.",
     "level": "Level 2"},
    {"problem": "What is $10\\%$ of 30?", "solution": "$0.1 \\cdot 30 = \\boxed{3}$", "level": "Level 1"},
]


def test_math_preset_reads_the_boxed_reference_and_verifies_latex(tmp_path):
    write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    task = get_task("math", path=str(tmp_path / "math.jsonl"), test_fraction=0.0)
    assert isinstance(task, MathTask)
    by_q = {e.question: e for e in task.examples("train", 3)}
    half = by_q["Compute $\\frac{2}{4}$."]
    assert half.answer == "\\frac{1}{2}"
    assert half.trace == f"<think>{MATH_ROWS[0]['solution']}</think><answer>\\frac{{1}}{{2}}</answer>"
    roots = by_q["Find the set of roots of $x^2 = 2$."]
    assert roots.answer == "\\{-\\sqrt{2}, \\sqrt{2}\\}"
    # keel's verifier (math-verify for LaTeX) decides the reward
    assert task.reward("<think>.</think><answer>\\frac12</answer>", half) == {"format": 1.0, "correct": 1.0}
    assert task.reward("<think>.</think><answer>0.5</answer>", half)["correct"] == 1.0
    assert task.reward("<think>.</think><answer>\\frac13</answer>", half)["correct"] == 0.0
    assert task.reward("so \\boxed{\\{\\sqrt2, -\\sqrt2\\}}", roots)["correct"] == 1.0
    assert task.reward("so \\boxed{\\{\\sqrt2\\}}", roots)["correct"] == 0.0


def test_math_preset_errors_name_what_to_do(tmp_path):
    with pytest.raises(KeelError, match="option path") as e:
        get_task("math")
    assert e.value.field == "task_options.path"
    write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1", "answer": "2"}])
    with pytest.raises(KeelError, match="no column 'problem'.*columns: question, answer"):
        get_task("math", path=str(tmp_path / "q.jsonl"))
    write_jsonl(tmp_path / "m.jsonl", MATH_ROWS + [{"problem": "2+2", "solution": "It is 4."}])
    with pytest.raises(KeelError, match=r"line 4: no \\boxed\{\} answer in 'solution'"):
        get_task("math", path=str(tmp_path / "m.jsonl"))


def test_empty_or_missing_dataset_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeelError, match="empty holds no dataset.*save_to_disk"):
        get_task(str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("# a dataset card, no data\n")
    with pytest.raises(KeelError, match="docs holds no dataset"):
        get_task(str(tmp_path / "docs"))
    with pytest.raises(KeelError, match="does not exist"):
        get_task(str(tmp_path / "nope") + "/")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "train.jsonl").write_text("\n")
    with pytest.raises(KeelError, match="blank has no rows"):
        get_task(str(tmp_path / "blank"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "state.json").write_text("{}")
    with pytest.raises(KeelError, match="cannot read .*junk as a `datasets` folder"):
        get_task(str(tmp_path / "junk"))
