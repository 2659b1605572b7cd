"""Metrics against hand-computed scores, label matching, cross-checks, data loading, a real run."""

import json
import sys

import numpy as np
import pytest

import hm3
from hm3.data import Dataset, load_data_block, load_dataset, parse_data_block
from hm3.errors import Hm3Error
from hm3.evaluate import evaluate, format_report, score_task
from hm3.heads import TaskGroup

from conftest import recipe_dict

SPAM = TaskGroup("spam", ("ham", "spam"), 0)
TOPIC = TaskGroup("topic", ("news", "sport", "film"), 2)
TOXIC = TaskGroup("toxic", ("insult", "threat"), 5, multi_label=True)

# Six texts with fixed probabilities on every head (spam, topic, toxic).
PROBABILITIES = {
    "t1": ([0.9, 0.1], [0.7, 0.2, 0.1], [0.9, 0.1]),
    "t2": ([0.8, 0.2], [0.6, 0.3, 0.1], [0.2, 0.7]),
    "t3": ([0.4, 0.6], [0.2, 0.7, 0.1], [0.8, 0.6]),
    "t4": ([0.3, 0.7], [0.5, 0.4, 0.1], [0.4, 0.3]),
    "t5": ([0.6, 0.4], [0.1, 0.1, 0.8], [0.1, 0.2]),
    "t6": ([0.7, 0.3], [0.8, 0.1, 0.1], [0.6, 0.1]),
}


class FixedModel:
    """A duck-typed classifier: fixed probabilities per text, and a count of forward passes."""

    groups = [SPAM, TOPIC, TOXIC]

    def __init__(self):
        self.passes = 0

    def predict_proba(self, texts, batch_size=32):
        self.passes += 1
        rows = [PROBABILITIES[text] for text in texts]
        return {group.name: np.array([row[i] for row in rows])
                for i, group in enumerate(self.groups)}


def probs(task, texts):
    return FixedModel().predict_proba(texts)[task]


TEXTS = ["t1", "t2", "t3", "t4", "t5", "t6"]
# Predicted spam labels: ham ham spam spam ham ham.
SPAM_TRUTH = ["ham", "ham", "ham", "spam", "spam", "ham"]


def test_single_label_scores_match_hand_computation():
    # ham: TP 3 (t1 t2 t6), FP 1 (t5), FN 1 (t3) -> P = R = F1 = 3/4.
    # spam: TP 1 (t4), FP 1 (t3), FN 1 (t5) -> P = R = F1 = 1/2.
    scores = score_task(SPAM, SPAM_TRUTH, probs("spam", TEXTS))
    assert scores["n"] == 6
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["macro_f1"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert scores["per_class"]["ham"] == pytest.approx(
        {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    assert scores["per_class"]["spam"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})


def test_macro_f1_averages_over_every_label_absent_ones_as_zero():
    # Predicted: news sport sport. news: P 1, R 1/2, F1 2/3; sport: P 1/2, R 1, F1 2/3; film: 0.
    scores = score_task(TOPIC, ["news", "news", "sport"], probs("topic", ["t1", "t3", "t3"]))
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert scores["per_class"]["film"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_multi_label_scores_on_the_label_matrix_in_every_label_format():
    # Predicted (> 0.5): t1 {insult}, t2 {threat}, t3 {insult, threat}, t4 {}.
    truth = [["insult"], "", '["insult", "threat"]', "threat"]
    scores = score_task(TOXIC, truth, probs("toxic", ["t1", "t2", "t3", "t4"]))
    # Subset accuracy: t1 and t3 right. insult F1 1; threat TP 1 FP 1 FN 1 -> F1 1/2.
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx(0.75)
    assert scores["per_class"]["threat"]["support"] == 2
    comma = score_task(TOXIC, ["insult", "", "insult, threat", "threat"],
                       probs("toxic", ["t1", "t2", "t3", "t4"]))
    assert comma == scores


def test_integer_labels_are_ids_and_names_win():
    assert score_task(SPAM, [0, "0", 0.0, 1, "1", "ham"], probs("spam", TEXTS)) == \
        score_task(SPAM, SPAM_TRUTH, probs("spam", TEXTS))
    stars = TaskGroup("stars", ("1", "2"), 0)
    assert score_task(stars, ["1", "2"], np.array([[0.9, 0.1], [0.2, 0.8]]))["accuracy"] == 1.0
    with pytest.raises(Hm3Error,
                       match=r"label 0 is not a label of task 'stars'; its labels are 1, 2$"):
        score_task(stars, [0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]))


def test_unknown_label_names_the_label_row_and_known_labels():
    with pytest.raises(Hm3Error) as error:
        score_task(SPAM, ["ham", "eggs"], probs("spam", ["t1", "t2"]), where="spam.csv")
    assert str(error.value) == ("spam.csv row 2: label 'eggs' is not a label of task 'spam'; "
                                "its labels are ham, spam, or ids 0..1")
    with pytest.raises(Hm3Error, match="label 7 is not a label"):
        score_task(SPAM, [7, 0], probs("spam", ["t1", "t2"]))
    with pytest.raises(Hm3Error, match="label 'rude' is not a label of task 'toxic'"):
        score_task(TOXIC, [["insult", "rude"]], probs("toxic", ["t1"]))


def test_evaluate_scores_each_task_and_cross_checks_from_one_pass():
    model = FixedModel()
    spam = Dataset("spam", TEXTS, SPAM_TRUTH, source="sms.csv",
                   expect={"topic": "news", "toxic": [], "jailbreak": "benign"})
    topic = Dataset("topic", ["t1", "t3", "t3"], ["news", "news", "sport"], expect={"spam": 0})
    report = evaluate(model, [spam, topic])
    assert model.passes == 2
    entry = report["tasks"]["spam"]
    assert entry["macro_f1"] == pytest.approx(0.625)
    assert entry["truncated"] is None  # the fake cannot count tokens
    # Topic argmax on t1..t6: news news sport news film news -> 4 of 6 are news.
    assert entry["cross_checks"]["topic"] == {"expected": "news", "agreement": pytest.approx(4 / 6),
                                              "n": 6}
    # Toxic with no label over 0.5: t4 and t5 only.
    assert entry["cross_checks"]["toxic"] == {"expected": [], "agreement": pytest.approx(2 / 6),
                                              "n": 6}
    assert entry["skipped_cross_checks"] == ["jailbreak"]
    # Spam argmax on t1 t3 t3: ham spam spam; expected id 0 = ham.
    assert report["tasks"]["topic"]["cross_checks"]["spam"]["expected"] == "ham"
    assert report["tasks"]["topic"]["cross_checks"]["spam"]["agreement"] == pytest.approx(1 / 3)
    assert report["mean_macro_f1"] == pytest.approx((0.625 + 4 / 9) / 2)
    assert json.loads(json.dumps(report)) == report

    text = format_report(report)
    assert "topic=news 66.7%" in text and "jailbreak: no such head" in text
    assert "mean macro-F1 over 2 tasks: 0.5347" in text
    assert "spam (sms.csv)" in text


def test_evaluate_checks_tasks_and_labels_before_any_forward_pass():
    model = FixedModel()
    with pytest.raises(Hm3Error,
                       match="model has no task 'sentiment'; its tasks are spam, topic, toxic"):
        evaluate(model, [Dataset("sentiment", ["t1"], ["good"])])
    with pytest.raises(Hm3Error, match="two datasets for task 'spam'"):
        evaluate(model, [Dataset("spam", ["t1"], ["ham"]), Dataset("spam", ["t2"], ["ham"])])
    with pytest.raises(Hm3Error, match=r"^x.csv: expect topic=weather: unknown label 'weather' "
                       r"for task topic \(labels: "):
        evaluate(model, [Dataset("spam", ["t1"], ["ham"], "x.csv", expect={"topic": "weather"})])
    with pytest.raises(Hm3Error, match="row 2: label 'eggs'"):
        evaluate(model, [Dataset("topic", ["t1"], ["news"]),
                         Dataset("spam", ["t1", "t2"], ["ham", "eggs"])])
    assert model.passes == 0
    with pytest.raises(Hm3Error, match="names the dataset's own task"):
        Dataset("spam", ["t1"], ["ham"], expect={"spam": "ham"})
    with pytest.raises(Hm3Error, match="2 texts but 1 labels"):
        Dataset("spam", ["t1", "t2"], ["ham"])


# --- data files --------------------------------------------------------------------------------

ROWS = [{"message": "win money now", "kind": "spam", "id": 1},
        {"message": "meeting today", "kind": "ham", "id": 2},
        {"message": "hello, what news?", "kind": "ham", "id": 3}]


def write(path, rows=ROWS):
    if path.suffix == ".csv":
        import csv
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n", encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        pandas = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        pandas.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_load_dataset_reads_every_file_type(tmp_path, suffix):
    path = write(tmp_path / f"sms{suffix}")
    data = load_dataset(path, "spam", text_column="message", label_column="kind",
                        expect={"topic": "news"})
    assert data.texts == [r["message"] for r in ROWS]
    assert data.labels == ["spam", "ham", "ham"]
    assert (data.task, data.source, data.expect) == ("spam", str(path), {"topic": "news"})
    first = load_dataset(path, "spam", text_column="message", label_column="kind", limit=2)
    assert first.texts == data.texts[:2]


def test_bad_files_and_columns_say_what_to_do(tmp_path, monkeypatch):
    path = write(tmp_path / "sms.csv")
    with pytest.raises(Hm3Error, match=r"has no column 'text' \(columns: message, kind, id\); "
                                       r"name the right one with --text-column \(text_column: in a "
                                       r"recipe\)"):
        load_dataset(path, "spam")
    with pytest.raises(Hm3Error, match="has no column 'label'.*label_column"):
        load_dataset(path, "spam", text_column="message")
    with pytest.raises(Hm3Error, match="missing.jsonl does not exist"):
        load_dataset(tmp_path / "missing.jsonl", "spam")
    (tmp_path / "sms.txt").write_text("hello\n")
    with pytest.raises(Hm3Error, match=r"unknown file type \.txt"):
        load_dataset(tmp_path / "sms.txt", "spam")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "ham"}\nnot json\n')
    with pytest.raises(Hm3Error, match=r"bad.jsonl:2 is not JSON"):
        load_dataset(tmp_path / "bad.jsonl", "spam")
    write(tmp_path / "gap.jsonl", [{"text": "a", "label": "ham"}, {"text": "b", "label": None}])
    with pytest.raises(Hm3Error, match="gap.jsonl row 2: no label in 'label'"):
        load_dataset(tmp_path / "gap.jsonl", "spam")
    with pytest.raises(Hm3Error, match="split and subset apply to Hugging Face datasets only"):
        load_dataset(path, "spam", split="test")
    with pytest.raises(Hm3Error, match="limit: expected a positive integer"):
        load_dataset(path, "spam", limit=0)

    (tmp_path / "sms.parquet").touch()
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(Hm3Error, match=r"needs pandas and pyarrow: pip install 'hm3\[data\]'"):
        load_dataset(tmp_path / "sms.parquet", "spam")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(Hm3Error, match=r"imdb is not a local file .*needs `datasets`: "
                                       r"pip install 'hm3\[data\]'"):
        load_dataset("imdb", "sentiment")


def test_data_block_is_validated_then_loaded_from_the_recipe_folder(tmp_path):
    write(tmp_path / "sms.jsonl", [{"text": "win money", "label": "spam"}])
    write(tmp_path / "news.csv", [{"body": "market news", "topic": "news"}])
    block = {"spam": "sms.jsonl",
             "topic": {"path": "news.csv", "text_column": "body", "label_column": "topic",
                       "expect": {"spam": "ham"}, "limit": 5}}
    spam, topic = load_data_block(block, root=tmp_path, tasks=["spam", "topic"])
    assert (spam.task, spam.texts, spam.labels) == ("spam", ["win money"], ["spam"])
    assert (topic.texts, topic.labels, topic.expect) == (["market news"], ["news"], {"spam": "ham"})
    assert topic.source == str(tmp_path / "news.csv")

    with pytest.raises(Hm3Error, match=r"data.topic: unknown field\(s\) column; allowed: path"):
        parse_data_block({"topic": {"path": "x.csv", "column": "body"}})
    with pytest.raises(Hm3Error, match=r"data.topic.expect: unknown task 'spamm'; "
                                       "known tasks are spam, topic"):
        parse_data_block({"topic": {"path": "x.csv", "expect": {"spamm": "ham"}}},
                         ["spam", "topic"])
    with pytest.raises(Hm3Error, match="data.sports: unknown task 'sports'"):
        parse_data_block({"sports": "x.csv"}, ["spam", "topic"])
    with pytest.raises(Hm3Error, match="data.topic.limit: expected a positive integer"):
        parse_data_block({"topic": {"path": "x.csv", "limit": "all"}})
    with pytest.raises(Hm3Error, match="data: expected a mapping"):
        parse_data_block(["x.csv"])


# --- a real model --------------------------------------------------------------------------------

def test_evaluate_merged_model_and_single_expert_end_to_end(family, tmp_path):
    base, experts = family
    merged = tmp_path / "merged"
    hm3.merge(hm3.parse_recipe(recipe_dict(base, experts)), merged, progress=False)
    model = hm3.load(merged, device="cpu")
    long_text = " ".join(["good"] * 40)  # 42 tokens with [CLS] and [SEP]; the tokenizer keeps 32
    texts = ["good film", "awful news", "great", "bad bad", long_text, "what a film"]
    labels = ["positive", "negative", "positive", "negative", "positive", 0]
    data = Dataset("sentiment", texts, labels, source="reviews", expect={"topic": "film"})

    report = evaluate(model, [data], batch_size=4)
    entry = report["tasks"]["sentiment"]
    assert report["max_length"] == 32 and entry["truncated"] == 1
    predicted = model.predict(texts)
    truth = ["positive", "negative", "positive", "negative", "positive", "negative"]
    right = [p["sentiment"]["label"] == t for p, t in zip(predicted, truth)]
    assert entry["accuracy"] == pytest.approx(np.mean(right))
    films = [p["topic"]["label"] == "film" for p in predicted]
    assert entry["cross_checks"]["topic"]["agreement"] == pytest.approx(np.mean(films))

    expert = hm3.load(experts["sentiment"], task="sentiment", device="cpu")
    alone = evaluate(expert, [data])["tasks"]["sentiment"]
    assert alone["n"] == 6 and alone["cross_checks"] == {}
    assert alone["skipped_cross_checks"] == ["topic"]
    assert "sentiment" in format_report(evaluate(expert, [data]), per_class=False)
