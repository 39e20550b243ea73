"""The GLUE readers against hand-written fixtures in GLUE's own file formats."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vqmoe_megatron.glue.tasks import TASKS, GlueDataError, check_task_files, get_task, read_split

FIXTURES = Path(__file__).parent / "fixtures" / "glue"

# (task, split, labels of all rows, first row's text_a, first row's text_b)
CASES = [
    ("CoLA", "train", [1, 0, 1, 0], "The sailors rode the breeze clear of the rocks.", None),
    ("CoLA", "dev", [1, 0, 1], "Mary sent a letter to Bill.", None),
    ("CoLA", "test", [None] * 3, "The children laughed.", None),
    ("SST-2", "train", [1, 0, 1, 0], "a gorgeous , witty , seductive movie . ", None),
    ("SST-2", "dev", [1, 0, 1], "it 's a lovely film with lovely performances . ", None),
    ("SST-2", "test", [None] * 2, "an utterly charming and hilarious film .", None),
    (
        "MRPC",
        "train",
        [1, 0, 1],
        'The company said " the deal is done , " and shares rose .',
        "Shares rose after the company said the deal was done .",
    ),
    (
        "MRPC",
        "dev",
        [1, 0],
        "The storm hit the coast late on Sunday .",
        "The storm reached the coast on Sunday night .",
    ),
    (
        "MRPC",
        "test",
        [None] * 2,
        "The vote is set for Thursday .",
        "Lawmakers will vote on Thursday .",
    ),
    (
        "STS-B",
        "train",
        [4.8, 0.0, 3.75],
        "A dog is running on the beach.",
        "A dog runs along the beach.",
    ),
    ("STS-B", "dev", [5.0, 2.5], "A man is playing a guitar.", "A man is playing a guitar."),
    ("STS-B", "test", [None] * 2, "A woman is slicing an onion.", "A woman cuts an onion."),
    (
        "QQP",
        "train",
        [1, 0, 1, 0],
        "How do I learn Python quickly?",
        "What is the fastest way to learn Python?",
    ),
    ("QQP", "dev", [1, 0], "How do I bake bread?", "What is a simple bread recipe?"),
    (
        "QQP",
        "test",
        [None] * 2,
        "How do I improve my handwriting?",
        "How can I write more neatly?",
    ),
    (
        "MNLI",
        "train",
        [2, 1, 0],
        "The new rules take effect in May.",
        "The rules are popular.",
    ),
    (
        "MNLI",
        "dev_matched",
        [2, 0],
        "The new parking rules are fair enough.",
        "Everyone prefers the new parking rules.",
    ),
    (
        "MNLI",
        "dev_mismatched",
        [0, 1],
        "Your donation helped us open a second clinic.",
        "The donation changed nothing.",
    ),
    (
        "MNLI",
        "test_matched",
        [None] * 2,
        "The harbour town is known for its fish market.",
        "The town has a fish market.",
    ),
    (
        "MNLI",
        "test_mismatched",
        [None] * 2,
        "So where are you going to spend the summer?",
        "You know where to spend the summer.",
    ),
    (
        "QNLI",
        "train",
        [1, 1, 0],
        "When did the second railway line open?",
        "Unlike the first line, the second one was built with private money.",
    ),
    (
        "QNLI",
        "dev",
        [0, 1],
        "What is the tallest tree species?",
        "The coast redwood is the tallest tree species on Earth.",
    ),
    (
        "QNLI",
        "test",
        [None] * 2,
        "Who built the bridge?",
        "The bridge was built by a local firm in 1901.",
    ),
    (
        "RTE",
        "train",
        [1, 0, 1],
        "No survivors were found in the wreckage of the ferry.",
        "Survivors were found in the wreckage.",
    ),
    (
        "RTE",
        "dev",
        [0, 1],
        "Anna Berg, the widow of the painter, died at 71.",
        "Anna Berg died at 71.",
    ),
    (
        "RTE",
        "test",
        [None] * 2,
        "The storm killed three people in Texas.",
        "Three people died in Texas.",
    ),
    (
        "WNLI",
        "train",
        [1, 0, 1],
        "I pushed a nail through the board. When I pulled the nail out, it left a hole.",
        "The board had a hole.",
    ),
    (
        "WNLI",
        "dev",
        [0, 1],
        "The landlord refused the tenants a pet because they feared damage.",
        "The tenants feared damage.",
    ),
    (
        "WNLI",
        "test",
        [None] * 2,
        "The man lifted the boy onto his shoulders.",
        "The man lifted the boy onto the boy's shoulders.",
    ),
]


def test_cases_cover_every_split_of_every_task():
    declared = {(task.name, spec.name) for task in TASKS.values() for spec in task.splits}
    assert {(task, split) for task, split, *_ in CASES} == declared
    assert len(TASKS) == 9


@pytest.mark.parametrize("task,split,labels,text_a,text_b", CASES)
def test_reader_returns_texts_and_labels(task, split, labels, text_a, text_b):
    result = read_split(FIXTURES, task, split)
    assert [example.label for example in result.examples] == labels
    assert (result.examples[0].text_a, result.examples[0].text_b) == (text_a, text_b)
    is_pair = get_task(task).text_b is not None
    assert all((example.text_b is not None) == is_pair for example in result.examples)
    if result.spec.is_test:
        assert [e.guid for e in result.examples] == [str(i) for i in range(len(labels))]
    else:
        assert [e.guid for e in result.examples] == [f"{split}-{i}" for i in range(len(labels))]


def test_label_ids_follow_the_declared_label_order():
    mnli = read_split(FIXTURES, "mnli", "train").examples
    names = [get_task("MNLI").labels[example.label] for example in mnli]
    assert names == ["neutral", "entailment", "contradiction"]
    qnli = read_split(FIXTURES, "QNLI", "dev").examples
    assert [get_task("QNLI").labels[e.label] for e in qnli] == ["entailment", "not_entailment"]


@pytest.mark.parametrize(
    "task,split,row,column,text",
    [
        ("CoLA", "train", 2, "text_a", 'Bill said "that he was leaving.'),
        ("CoLA", "test", 2, "text_a", 'She wondered "whether to go.'),
        ("SST-2", "train", 2, "text_a", "it 's a \" charming and often affecting journey . "),
        ("QQP", "train", 2, "text_a", 'What does "carpe diem mean?'),
        ("STS-B", "train", 2, "text_b", 'He is "probably right, I think.'),
        ("MNLI", "train", 2, "text_a", 'He shouted " stop and nobody moved.'),
        ("RTE", "train", 2, "text_a", 'The minister said "we will not resign.'),
    ],
)
def test_unbalanced_quotes_are_read_verbatim(task, split, row, column, text):
    examples = read_split(FIXTURES, task, split).examples
    assert getattr(examples[row], column) == text


def test_mrpc_header_with_byte_order_mark_is_accepted():
    for split in ("train", "dev"):
        assert (FIXTURES / "MRPC" / f"{split}.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
        assert len(read_split(FIXTURES, "MRPC", split).examples) > 0


def test_qqp_malformed_rows_are_counted_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="vqmoe_megatron.glue.tasks"):
        result = read_split(FIXTURES, "QQP", "train")
    assert result.malformed_lines == (5, 6)
    assert [e.text_a for e in result.examples][-1] == "Is coffee bad for you?"
    assert "skipped 2 malformed rows" in caplog.text and "lines 5, 6" in caplog.text


def test_registry_is_consistent():
    submissions = set()
    for task in TASKS.values():
        for spec in task.splits:
            needed = {task.text_a} | ({task.text_b} if task.text_b else set())
            needed.add(task.index_column if spec.is_test else task.label_column)
            assert needed <= set(spec.columns), (task.name, spec.name)
            if spec.is_test:
                submissions.add(spec.submission)
        assert task.splits[0].name == "train" and task.dev_splits and task.test_splits
    assert submissions == {
        f"{name}.tsv"
        for name in (
            "CoLA",
            "SST-2",
            "MRPC",
            "STS-B",
            "QQP",
            "MNLI-m",
            "MNLI-mm",
            "QNLI",
            "RTE",
            "WNLI",
        )
    }


def test_declared_formats():
    assert get_task("MNLI").split("train").columns[8:10] == ("sentence1", "sentence2")
    assert len(get_task("MNLI").split("train").columns) == 12
    assert len(get_task("MNLI").split("dev_matched").columns) == 16
    assert get_task("MNLI").split("dev_mismatched").columns[-1] == "gold_label"
    assert len(get_task("STS-B").split("train").columns) == 10
    assert get_task("STS-B").split("dev").columns[-1] == "score"
    assert not get_task("CoLA").split("train").has_header
    assert get_task("CoLA").split("test").has_header
    assert get_task("STS-B").is_regression and get_task("STS-B").num_labels == 1
    assert get_task("MNLI").num_labels == 3


@pytest.mark.parametrize(
    "alias,name",
    [
        ("sst2", "SST-2"),
        ("SST-2", "SST-2"),
        ("sts_b", "STS-B"),
        ("stsb", "STS-B"),
        ("cola", "CoLA"),
    ],
)
def test_task_names_ignore_case_and_separators(alias, name):
    assert get_task(alias).name == name


def test_check_task_files_lists_every_split():
    paths = check_task_files(FIXTURES, "MNLI")
    assert list(paths) == [
        "train",
        "dev_matched",
        "dev_mismatched",
        "test_matched",
        "test_mismatched",
    ]
    assert all(path.is_file() for path in paths.values())


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(GlueDataError) as err:
        get_task("QNL")
    message = str(err.value)
    assert "'QNL'" in message and "did you mean QNLI" in message
    assert all(name in message for name in TASKS)
