"""`hm3 check`: the label-free pre-deployment check of a merged model against its experts, and
multi-label groups end to end (eval, search scoring, cross-checks, head steps, check)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hm3 import Hm3Error, Hm3Warning
from hm3.check import compare_task, parse_thresholds
from hm3.cli import main
from hm3.evaluate import Dataset, evaluate
from hm3.heads import TaskGroup
from hm3.label_free import align_heads
from hm3.model import load
from hm3.search import SplitScorer

from conftest import build_family, random_texts, recipe_dict, spread_head

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
         "tags": ["urgent", "spam", "personal"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


# --- the figures, by hand ------------------------------------------------------------------------

def test_single_label_figures_by_hand():
    group = TaskGroup("s", ("a", "b", "c"), 0)
    expert = [[.7, .2, .1], [.1, .8, .1], [.2, .2, .6], [.6, .3, .1]]   # a b c a
    merged = [[.6, .3, .1], [.5, .4, .1], [.2, .2, .6], [.2, .7, .1]]   # a a c b
    out = compare_task(group, np.array(expert), np.array(merged))
    assert out["agreement"] == 0.5
    assert out["drift"] == pytest.approx(0.0)  # same histogram, two labels swapped
    assert sorted((f["from"], f["to"], f["count"]) for f in out["flips"]) == [("a", "b", 1),
                                                                             ("b", "a", 1)]
    assert out["mean_abs_dp"] == pytest.approx(1.8 / 12)
    assert out["expert_shares"] == {"a": 0.5, "b": 0.25, "c": 0.25}
    collapsed = compare_task(group, np.array(expert), np.array([[.8, .1, .1]] * 4))
    assert collapsed["drift"] == pytest.approx(0.5)  # 1/2 * (|1 - .5| + .25 + .25)
    assert collapsed["agreement"] == 0.5


@pytest.mark.parametrize("threshold, agreement, drift", [(0.5, 1 / 3, 2 / 3), (0.85, 1.0, 0.0)])
def test_multi_label_figures_by_hand_at_the_groups_threshold(threshold, agreement, drift):
    group = TaskGroup("t", ("x", "y"), 0, multi_label=True, threshold=threshold)
    expert = np.array([[.9, .1], [.8, .6], [.2, .7]])
    merged = np.array([[.9, .4], [.3, .4], [.2, .2]])
    out = compare_task(group, expert, merged)
    assert out["agreement"] == pytest.approx(agreement)  # the worst label's
    assert out["drift"] == pytest.approx(drift)
    assert out["mean_abs_dp"] == pytest.approx(1.5 / 6)
    if threshold == 0.5:
        # x on/off: expert 1 1 0, merged 1 0 0; y: expert 0 1 1, merged 0 0 0
        assert out["label_agreement"] == pytest.approx({"x": 2 / 3, "y": 1 / 3})
        assert out["mean_label_agreement"] == pytest.approx(0.5)
        assert out["exact_agreement"] == pytest.approx(1 / 3)
        assert out["flips"] == [{"label": "x", "on_to_off": 1, "off_to_on": 0},
                                {"label": "y", "on_to_off": 2, "off_to_on": 0}]
    else:
        assert out["flips"] == []


def test_thresholds_for_every_task_or_one():
    tasks = ["a", "b"]
    assert parse_thresholds([], tasks) == {"a": 0.9, "b": 0.9}
    assert parse_thresholds(["0.8", "b=0.95"], tasks) == {"a": 0.8, "b": 0.95}
    for bad, message in (["1.5", r"share in \[0, 1\]"], ["c=0.5", "no task 'c'"],
                         ["a=x", "share in"]):
        with pytest.raises(Hm3Error, match=message):
            parse_thresholds([bad], tasks)


def test_align_agreement_uses_the_groups_threshold():
    group = TaskGroup("t", ("x",), 0, multi_label=True, threshold=0.8)
    logits = torch.tensor([[0.5], [2.0]])   # sigmoid .62 (off at .8), .88 (on)
    target = torch.tensor([[1.0], [1.0]])   # sigmoid .73: off at .8
    assert align_heads._agreement(logits, target, group) == 0.5
    assert align_heads._agreement(logits, target, TaskGroup("t", ("x",), 0, True, 0.5)) == 1.0


# --- a merged family with a multi-label expert ---------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """Three experts (one multi-label) with spread heads, merged with head alignment and
    re-centring on per-task calibration texts; separate check texts."""
    root = tmp_path_factory.mktemp("check")
    # Small fine-tuning moves: the merge keeps most decisions, so a broken one stands out.
    base, experts = build_family(root, TASKS, multi_label=("tags",), noise=0.0005)
    calibration = {}
    for i, (task, folder) in enumerate(experts.items()):
        texts = random_texts(40, seed=i)
        (root / f"{task}.txt").write_text("\n".join(texts) + "\n")
        calibration[task] = str(root / f"{task}.txt")
        spread_head(folder, texts, seed=i)
    check_texts = [t for t in random_texts(200, seed=99)
                   if not any(t in (root / f"{x}.txt").read_text() for x in experts)][:120]
    (root / "check.txt").write_text("\n".join(check_texts) + "\n")
    recipe = recipe_dict(base, experts, "ties", parameters={"density": 0.5},
                         calibration={"texts": calibration, "batch_size": 8},
                         align_heads=True, recentre=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(root / "recipe.yaml"), "-o", str(root / "merged"),
                 "--no-progress"]) == 0
    return root, base, experts, check_texts


@torch.no_grad()
def plain_logits(folder: Path, texts: list[str]) -> np.ndarray:
    """A model's logits with plain transformers (independent of hm3)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.double().numpy()


def reference(fam, merged_dir: Path) -> dict[str, float]:
    """Each task's agreement computed from plain-transformers logits: argmax, or every label's
    on/off at sigmoid > 0.5 (logit > 0), the worst label's share."""
    root, _, experts, texts = fam
    merged = plain_logits(merged_dir, texts)
    out, offset = {}, 0
    for task, labels in TASKS.items():
        mine, theirs = merged[:, offset:offset + len(labels)], plain_logits(experts[task], texts)
        if task == "tags":
            out[task] = float(((mine > 0) == (theirs > 0)).mean(0).min())
        else:
            out[task] = float((mine.argmax(1) == theirs.argmax(1)).mean())
        offset += len(labels)
    return out


def run_check(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_reports_each_tasks_agreement_as_computed_independently(fam, tmp_path, capsys,
                                                                    recwarn):
    root = fam[0]
    code, out, err = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                                "--min-agreement", "0", "--json", str(tmp_path / "c.json")],
                               capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "c.json").read_text())
    want = reference(fam, root / "merged")
    for task in TASKS:
        assert report["tasks"][task]["agreement"] == pytest.approx(want[task], abs=1e-9)
        assert report["tasks"][task]["passed"] is True
        assert report["tasks"][task]["n"] == len(fam[3])
    assert report["experts"] == {t: str(p) for t, p in fam[2].items()}  # the recorded sources
    assert report["calibration_overlap"] == {t: 0 for t in TASKS}
    assert not [w for w in recwarn if issubclass(w.category, Hm3Warning)]
    assert "verdict (on every text): pass: 3 of 3 tasks" in out
    assert "tags: worst label" in out
    for task in TASKS:  # the merge's own figures on its calibration texts: as fitted, held out
        row = next(line for line in out.splitlines() if line.startswith(task + " "))
        recorded = report["calibration_figures"][task]["agreement"]
        held = report["calibration_held_out"][task]["agreement"]
        assert row.split()[-2:] == [f"{recorded:.1%}", f"{held:.1%}"]
        assert report["calibration_held_out"][task]["n"] == 40
    assert "on calibration (optimistic)" in out and "held out (k-fold)" in out


def test_per_task_thresholds_decide_the_verdict_and_the_exit_code(fam, capsys):
    root = fam[0]
    want = reference(fam, root / "merged")
    args = [str(root / "merged"), "--texts", str(root / "check.txt")]
    below = [f"{t}={max(v - 0.005, 0):.4f}" for t, v in want.items()]
    assert run_check([*args, "--min-agreement", "1", *(x for b in below
                                                      for x in ("--min-agreement", b))],
                     capsys)[0] == 0  # later items win over the global 1
    worst = min(want, key=want.get)
    assert want[worst] < 1
    code, out, _ = run_check([*args, "--min-agreement", "0", "--min-agreement", f"{worst}=1"],
                             capsys)
    assert code == 1
    assert f"verdict (on every text): FAIL ({worst})" in out
    assert f"{worst}: FAIL: agreement {want[worst]:.1%} < 100.0%" in out
    assert out.count("FAIL:") == 1


def test_a_broken_merge_fails_the_check(fam, tmp_path, capsys):
    """The topic rows of the merged head replaced by a constant 'news' decision: topic fails,
    the other tasks still pass, exit code 1; the JSON says the same."""
    root = fam[0]
    broken = tmp_path / "broken"
    shutil.copytree(root / "merged", broken)
    weights = load_file(broken / "model.safetensors")
    weights["classifier.weight"][2:5] = 0
    weights["classifier.bias"][2:5] = torch.tensor([5.0, 0.0, 0.0])
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    expert_news = (plain_logits(fam[2]["topic"], fam[3]).argmax(1) == 0).mean()
    assert expert_news < 0.8  # the expert does not say "news" for everything
    want = reference(fam, root / "merged")
    assert min(want.values()) > 0.85  # the merge as written keeps the experts' decisions
    floor = 0.8
    code, out, _ = run_check([str(broken), "--texts", str(root / "check.txt"),
                              "--min-agreement", f"{floor:.4f}", "--json",
                              str(tmp_path / "b.json")], capsys)
    assert code == 1
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["passed"] is False, (want, expert_news, floor, report["tasks"])
    assert report["tasks"]["topic"]["passed"] is False
    assert report["tasks"]["topic"]["agreement"] == pytest.approx(expert_news)
    assert report["tasks"]["topic"]["merged_shares"]["news"] == 1.0
    assert report["tasks"]["sentiment"]["passed"] and report["tasks"]["tags"]["passed"]
    assert "verdict (on every text): FAIL (topic)" in out
    assert "sport->news" in out or "film->news" in out


def test_max_drift_fails_a_task_whose_label_shares_move(fam, tmp_path, capsys):
    root = fam[0]
    code, out, _ = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                              "--min-agreement", "0", "--max-drift", "0", "--json",
                              str(tmp_path / "d.json")], capsys)
    report = json.loads((tmp_path / "d.json").read_text())
    drifted = [t for t, e in report["tasks"].items() if e["drift"] > 0]
    assert code == (1 if drifted else 0)
    for task in drifted:
        assert f"{task}: FAIL: drift" in out


def test_check_warns_when_given_the_calibration_texts(fam, capsys):
    root = fam[0]
    with pytest.warns(Hm3Warning, match="some check texts were calibration texts of this "
                      "merge.*topic 40 of 40.*optimistic"):
        code, _, _ = run_check([str(root / "merged"), "--texts", str(root / "topic.txt"),
                                "--min-agreement", "0"], capsys)
    assert code == 0


def test_experts_named_explicitly_or_by_folder(fam, capsys):
    root, _, experts, _ = fam
    args = [str(root / "merged"), "--texts", str(root / "check.txt"), "--min-agreement", "0"]
    code, out, _ = run_check([*args, "--experts", f"topic={experts['topic']}",
                              str(experts["sentiment"])], capsys)
    assert code == 0
    assert "not checked (no expert given): tags" in out


@pytest.mark.parametrize("extra, message", [
    (["--experts", "topic={sentiment}"], "expert for 'topic' has labels negative, positive"),
    (["--experts", "{sentiment}", "sentiment={sentiment}"], "two experts for task"),
    (["--experts", "nope=/x"], "no task 'nope'"),
    (["--min-agreement", "topics=0.5"], "no task 'topics'"),
    (["--max-drift", "2"], r"--max-drift: expected a distance in \[0, 1\]"),
])
def test_bad_check_arguments_exit_2_with_a_message(fam, capsys, extra, message):
    root, _, experts, _ = fam
    extra = [e.format(sentiment=experts["sentiment"]) for e in extra]
    code, out, err = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                                *extra], capsys)
    assert code == 2
    assert out == ""
    assert message.replace("\\", "") in err or __import__("re").search(message, err)


def test_check_refuses_a_plain_classifier(fam, capsys):
    root, _, experts, _ = fam
    code, _, err = run_check([str(experts["topic"]), "--texts", str(root / "check.txt")], capsys)
    assert code == 2 and "not an hm3-merged model" in err


# --- multi-label scoring end to end --------------------------------------------------------------

def f1_by_hand(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 over the labels of 0/1 matrices, counted by hand."""
    scores = []
    for k in range(truth.shape[1]):
        tp = int((truth[:, k] & predicted[:, k]).sum())
        fp = int((~truth[:, k] & predicted[:, k]).sum())
        fn = int((truth[:, k] & ~predicted[:, k]).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def test_multi_label_task_is_scored_per_label_in_eval_search_and_cross_checks(fam):
    root, _, _, texts = fam
    rng = np.random.default_rng(0)
    truth = rng.random((len(texts), 3)) < 0.4
    labels = [[TASKS["tags"][k] for k in np.flatnonzero(row)] for row in truth]
    merged_logits = plain_logits(root / "merged", texts)
    predicted = merged_logits[:, 5:8] > 0
    want = f1_by_hand(truth, predicted)
    model = load(root / "merged", device="cpu")
    data = Dataset("tags", texts, labels, expect={"topic": "sport"})
    report = evaluate(model, [data])
    entry = report["tasks"]["tags"]
    assert entry["multi_label"] is True
    assert entry["macro_f1"] == pytest.approx(want)
    assert set(entry["per_class"]) == set(TASKS["tags"])
    k = 1
    tp = int((truth[:, k] & predicted[:, k]).sum())
    assert entry["per_class"]["spam"]["precision"] == pytest.approx(
        tp / max(predicted[:, k].sum(), 1))
    assert entry["per_class"]["spam"]["recall"] == pytest.approx(tp / truth[:, k].sum())
    sport = float((merged_logits[:, 2:5].argmax(1) == 1).mean())
    assert entry["cross_checks"]["topic"]["agreement"] == pytest.approx(sport)
    # the search scores its trials with the same per-label macro-F1
    scorer = SplitScorer(model, [data], batch_size=16)
    assert scorer.score_all()["tags"]["macro_f1"] == pytest.approx(want)
    # a cross-check ON the multi-label head: news texts should carry no tag at all
    news = Dataset("topic", texts, ["news"] * len(texts), expect={"tags": []})
    nothing = float((~predicted).all(1).mean())
    assert evaluate(model, [news])["tasks"]["topic"]["cross_checks"]["tags"]["agreement"] == \
        pytest.approx(nothing)


def test_multi_label_head_steps_match_the_experts_on_off_rates(fam):
    """After align_heads + recentre, each tag is on for the same share of calibration texts as
    with its expert (recentre's target), as the merge's own record says."""
    root, _, experts, _ = fam
    texts = (root / "tags.txt").read_text().split("\n")[:-1]
    merged = plain_logits(root / "merged", texts)[:, 5:8]
    expert = plain_logits(experts["tags"], texts)
    np.testing.assert_allclose((merged > 0).mean(0), (expert > 0).mean(0), atol=1 / 40 + 1e-9)
    label_free = json.loads((root / "merged" / "config.json").read_text())["hm3"]["label_free"]
    assert label_free["recentre"]["tasks"]["tags"]["after"] == pytest.approx(
        (merged > 0).mean(0), abs=1e-4)
    want = float(((merged > 0) == (expert > 0)).mean(0).min())
    assert label_free["fidelity"]["tasks"]["tags"]["agreement"] == pytest.approx(want, abs=1e-9)


# --- counting the texts an expert is sure of (mixed traffic) --------------------------------

def test_confident_agreement_counts_only_texts_the_expert_is_sure_of():
    from hm3.check import compare_task, verdicts
    from hm3.heads import TaskGroup

    group = TaskGroup("topic", ("a", "b"), 0)
    # four sure texts (p >= 0.9), three of them kept; two unsure texts, both flipped
    expert = np.array([[0.95, 0.05], [0.92, 0.08], [0.05, 0.95], [0.02, 0.98],
                       [0.6, 0.4], [0.45, 0.55]])
    merged = np.array([[0.8, 0.2], [0.7, 0.3], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6], [0.55, 0.45]])
    entry = compare_task(group, expert, merged)
    assert entry["agreement"] == pytest.approx(3 / 6)
    assert entry["confident_n"] == 4 and entry["confident_agreement"] == pytest.approx(3 / 4)
    report = {"tasks": {"topic": dict(entry)}}
    assert verdicts(report, {"topic": 0.7}, count="all")["tasks"]["topic"]["passed"] is False
    confident = verdicts({"tasks": {"topic": dict(entry)}}, {"topic": 0.7}, count="confident")
    assert confident["counted"] == "confident" and confident["tasks"]["topic"]["passed"] is True
    assert confident["tasks"]["topic"]["verdict_agreement"] == pytest.approx(0.75)
    with pytest.raises(Hm3Error, match="count: expected one of all, confident, weighted, surest"):
        verdicts(report, {"topic": 0.7}, count="sure")


def test_confident_agreement_of_a_multi_label_task_is_its_worst_label_where_sure():
    from hm3.check import compare_task
    from hm3.heads import TaskGroup

    group = TaskGroup("tags", ("x", "y"), 0, multi_label=True)
    expert = np.array([[0.95, 0.5], [0.02, 0.97], [0.5, 0.03]])
    merged = np.array([[0.8, 0.9], [0.7, 0.9], [0.1, 0.01]])
    entry = compare_task(group, expert, merged)
    # x: sure on texts 0, 1 -> 1 of 2 agree; y: sure on texts 1, 2 -> 2 of 2 agree
    assert entry["confident_n"] == 2 and entry["confident_agreement"] == pytest.approx(0.5)
    nothing = compare_task(group, np.full((2, 2), 0.5), np.full((2, 2), 0.5))
    assert nothing["confident_n"] == 0 and nothing["confident_agreement"] is None


def test_weighted_agreement_weighs_each_text_by_the_experts_confidence_above_chance():
    from hm3.check import compare_task, verdicts
    from hm3.heads import TaskGroup

    group = TaskGroup("topic", ("a", "b", "c", "d"), 0)
    # weights (p_max - 1/4) / (3/4): 1, 0.5, 0 (at chance), 0.2
    expert = np.array([[1.0, 0, 0, 0], [0, 0.625, 0.375, 0], [0.25] * 4, [0.1, 0.1, 0.4, 0.4]])
    merged = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0.7, 0.1, 0.1, 0.1],
                       [0.1, 0.1, 0.5, 0.3]])
    # text 0 agrees (w 1), text 1 does not (w 0.5), text 2 agrees but weighs 0, text 3 agrees
    # (argmax of a tie: the first, label c, as the merged model's)
    entry = compare_task(group, expert, merged)
    assert entry["weighted_agreement"] == pytest.approx(1.2 / 1.7)
    assert entry["agreement"] == pytest.approx(3 / 4)
    report = verdicts({"tasks": {"topic": dict(entry)}}, {"topic": 0.7}, count="weighted")
    assert report["counted"] == "weighted" and report["tasks"]["topic"]["passed"] is True
    assert report["tasks"]["topic"]["verdict_agreement"] == pytest.approx(1.2 / 1.7)
    # an expert always at chance has no weighted figure: the verdict falls back to every text
    chance = compare_task(group, np.full((2, 4), 0.25), merged[:2])
    assert chance["weighted_agreement"] is None
    fallback = verdicts({"tasks": {"topic": dict(chance)}}, {"topic": 0.7}, count="weighted")
    assert fallback["tasks"]["topic"]["verdict_agreement"] == chance["agreement"]


def test_weighted_agreement_of_a_multi_label_task_is_its_worst_label():
    from hm3.check import compare_task
    from hm3.heads import TaskGroup

    group = TaskGroup("tags", ("x", "y"), 0, multi_label=True, threshold=0.5)
    expert = np.array([[0.9, 0.5], [0.2, 1.0], [0.5, 0.0]])
    merged = np.array([[0.8, 0.9], [0.7, 0.9], [0.1, 0.2]])
    # x: weights 0.8, 0.6, 0 -> agree on text 0 only: 0.8 / 1.4; y: weights 0, 1, 1 -> text 1
    # agrees, text 2 agrees: 1
    entry = compare_task(group, expert, merged)
    assert entry["weighted_agreement"] == pytest.approx(0.8 / 1.4)


def test_surest_agreement_counts_the_quarter_of_texts_the_expert_is_surest_of():
    from hm3.check import compare_task, format_check, verdicts
    from hm3.heads import TaskGroup

    group = TaskGroup("topic", ("a", "b", "c"), 0)
    # an expert never 90% sure: top probabilities 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.36, 0.34
    tops = [0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.36, 0.34]
    expert = np.array([[p, (1 - p) / 2, (1 - p) / 2] for p in tops])
    # the merged model keeps the label on the two surest texts, flips the others
    merged = np.array([[0.9, 0.05, 0.05]] * 2 + [[0.1, 0.8, 0.1]] * 6)
    entry = compare_task(group, expert, merged)
    assert entry["confident_n"] == 0 and entry["confident_agreement"] is None
    assert entry["surest_n"] == 2 and entry["surest_agreement"] == 1.0
    assert entry["agreement"] == 0.25
    report = verdicts({"tasks": {"topic": dict(entry)}}, {"topic": 0.9}, count="surest")
    assert report["tasks"]["topic"]["passed"] is True
    assert "surest" in format_check(report)
    # flip the surest text instead: half of the surest quarter disagrees
    merged[0] = [0.1, 0.8, 0.1]
    failed = verdicts({"tasks": {"topic": compare_task(group, expert, merged)}},
                      {"topic": 0.9}, count="surest")
    assert failed["tasks"]["topic"]["passed"] is False
    assert "the 2 texts the expert is surest of 50.0%" in failed["tasks"]["topic"]["reasons"][0]


def test_surest_agreement_of_a_multi_label_task_is_its_worst_label():
    from hm3.check import compare_task
    from hm3.heads import TaskGroup

    group = TaskGroup("tags", ("x", "y"), 0, multi_label=True, threshold=0.5)
    expert = np.array([[0.99, 0.5], [0.6, 0.02], [0.5, 0.45], [0.4, 0.55]])
    merged = np.array([[0.9, 0.9], [0.1, 0.9], [0.1, 0.2], [0.1, 0.2]])
    # x: surest text 0 (0.98), merged keeps it on: 1; y: surest text 1 (0.96), merged flips it
    entry = compare_task(group, expert, merged)
    assert entry["surest_n"] == 1 and entry["surest_agreement"] == 0.0


def test_label_agreement_weighs_each_label_the_expert_gives_the_same():
    """Eight hams kept and one of two spams lost: 90% of the texts agree, but the spam label
    keeps only half, so the per-label agreement is (1 + 0.5) / 2."""
    from hm3.check import label_agreement

    group = TaskGroup("spam", ("ham", "spam"), 0)
    expert = np.array([[0.9, 0.1]] * 8 + [[0.2, 0.8]] * 2)
    merged = np.array([[0.8, 0.2]] * 8 + [[0.3, 0.7], [0.6, 0.4]])
    assert compare_task(group, expert, merged)["agreement"] == pytest.approx(0.9)
    found = label_agreement(group, expert, merged)
    assert found == {"balanced_agreement": pytest.approx(0.75), "balanced_labels": 2}
    # counted texts only: without the lost spam every label the expert gives agrees
    counted = np.ones(10, bool)
    counted[9] = False
    assert label_agreement(group, expert, merged, counted, "domain_balanced") == {
        "domain_balanced_agreement": 1.0, "domain_balanced_labels": 2}
    # a label the expert never gives is not averaged in (film, below)
    topic = TaskGroup("topic", ("news", "sport", "film"), 0)
    expert3 = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    merged3 = np.array([[0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    assert label_agreement(group=topic, expert=expert3, merged=merged3) == {
        "balanced_agreement": 0.5, "balanced_labels": 2}
    assert label_agreement(group, expert, merged, np.zeros(10, bool)) == {
        "balanced_agreement": None, "balanced_labels": 0}
    with pytest.raises(Hm3Error, match="one entry per text \\(10\\), got shape \\(9,\\)"):
        label_agreement(group, expert, merged, np.ones(9, bool))


def test_label_agreement_of_a_multi_label_task_is_its_worst_labels_on_off_mean():
    from hm3.check import label_agreement

    group = TaskGroup("tags", ("x", "y"), 0, multi_label=True, threshold=0.3)
    # x: on for texts 0-1 (merged keeps 1 of 2), off for 2-5 (merged keeps all): (0.5 + 1) / 2;
    # y: on for text 0 only, kept; off texts 1-5, one turned on: (1 + 0.8) / 2
    expert = np.array([[0.9, 0.4], [0.5, 0.1], [0.1, 0.1], [0.2, 0.2], [0.1, 0.1], [0.1, 0.1]])
    merged = np.array([[0.8, 0.5], [0.2, 0.1], [0.1, 0.1], [0.2, 0.35], [0.1, 0.1], [0.1, 0.1]])
    assert label_agreement(group, expert, merged) == {
        "balanced_agreement": pytest.approx(0.75), "balanced_labels": 2}
    # a label the expert leaves off everywhere counts by its plain agreement
    expert[:, 1] = 0.0
    merged[:, 1] = [0.0, 0.0, 0.0, 0.9, 0.0, 0.0]
    found = label_agreement(group, expert, merged)
    assert found["balanced_agreement"] == pytest.approx(min(0.75, 5 / 6))
    assert found["balanced_labels"] == 1


def test_a_multi_label_task_is_compared_at_its_own_threshold():
    """A label is on above the task's threshold (0.3 here), not above 0.5: probabilities of
    0.4 and 0.45 are both "on", so the merged model agrees with its expert on every text."""
    group = TaskGroup("tox", ("insult", "threat"), 0, multi_label=True, threshold=0.3)
    expert = np.array([[0.4, 0.1], [0.9, 0.05], [0.45, 0.2], [0.1, 0.35]])
    merged = np.array([[0.6, 0.1], [0.8, 0.1], [0.35, 0.25], [0.2, 0.55]])
    report = compare_task(group, expert, merged)
    assert report["agreement"] == report["exact_agreement"] == 1.0
    assert report["flips"] == [] and report["drift"] == 0.0
    assert report["expert_shares"] == {"insult": 0.75, "threat": 0.25}
    assert report["weighted_agreement"] == report["confident_agreement"] == 1.0


# --- counting the texts typical of each task (mixed traffic) ------------------------------------

def test_typicality_is_the_mean_cosine_to_the_nearest_references_by_hand():
    from hm3.check import typicality

    references = np.array([[1.0, 0.0], [0.0, 2.0]])  # the x and y axes (lengths do not count)
    texts = np.array([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # nearest reference: 1, cos 45 deg, 0 (y axis at 90 deg beats -x at 180 deg)
    assert typicality(texts, references, k=1) == pytest.approx([1.0, 0.5 ** 0.5, 0.0])
    # both references: (1 + 0) / 2, cos 45 deg twice, (-1 + 0) / 2
    assert typicality(texts, references, k=2) == pytest.approx([0.5, 0.5 ** 0.5, -0.5])
    assert typicality(texts, references, k=5) == pytest.approx([0.5, 0.5 ** 0.5, -0.5])
    # leave one out: each reference against the other only
    assert typicality(references, references, k=3, leave_one_out=True) == pytest.approx([0, 0])


def test_typical_texts_keep_texts_as_close_as_the_references_are_to_each_other():
    from hm3.check import typical_texts

    # references at 0, 10, 20, 30 degrees: each one's nearest other is 10 degrees away
    angles = np.radians([0, 10, 20, 30])
    references = np.stack([np.cos(angles), np.sin(angles)], 1)
    # texts 5 deg from their nearest reference (at 5 and 35 deg), 15 deg (45) and 60 deg (90)
    texts = np.stack([np.cos(np.radians([5, 35, 45, 90])), np.sin(np.radians([5, 35, 45, 90]))], 1)
    # threshold: cos 10 deg (every reference's own typicality at k=1)
    assert typical_texts(texts, references, k=1, level=0.1).tolist() == [True, True, False,
                                                                         False]
    with pytest.raises(Hm3Error, match="need at least 2 texts known to be from the task"):
        typical_texts(texts, references[:1])


def test_typical_agreement_counts_only_the_typical_texts_and_the_verdict_says_so():
    from hm3.check import compare_task, format_check, typical_agreement, verdicts

    group = TaskGroup("topic", ("a", "b"), 0)
    expert = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7]])
    merged = np.array([[0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.4, 0.6], [0.2, 0.8]])
    typical = np.array([True, True, False, False, True])  # the three texts kept; 2, 3 flipped
    entry = compare_task(group, expert, merged, typical)
    assert entry["agreement"] == pytest.approx(3 / 5)
    assert entry["typical_n"] == 3 and entry["typical_agreement"] == 1.0
    entry["typical_references"] = 40
    report = verdicts({"tasks": {"topic": dict(entry)}}, {"topic": 0.9}, count="typical")
    assert report["counted"] == "typical" and report["tasks"]["topic"]["passed"] is True
    assert report["tasks"]["topic"]["verdict_counted"] == ("on the 3 texts typical of the "
                                                           "task's 40 texts")
    assert "verdict (on the texts typical of each task" in format_check(report)
    assert verdicts({"tasks": {"topic": dict(entry)}}, {"topic": 0.9}, count="all")[
        "tasks"]["topic"]["passed"] is False
    # the flipped texts typical instead: 1 of 3 agrees
    flipped = compare_task(group, expert, merged, np.array([True, False, True, True, False]))
    failed = verdicts({"tasks": {"topic": flipped}}, {"topic": 0.9}, count="typical")
    assert "agreement on the 3 texts typical of the task 33.3% < 90.0%" in failed["tasks"][
        "topic"]["reasons"][0]
    # no typical text: None, and the verdict falls back to every text
    none = compare_task(group, expert, merged, np.zeros(5, bool))
    assert none["typical_n"] == 0 and none["typical_agreement"] is None
    fallback = verdicts({"tasks": {"topic": none}}, {"topic": 0.5}, count="typical")
    assert fallback["tasks"]["topic"]["verdict_agreement"] == pytest.approx(3 / 5)
    # a multi-label task: its worst label on the typical texts
    tags = TaskGroup("tags", ("x", "y"), 0, multi_label=True)
    out = typical_agreement(tags, np.array([[0.9, 0.9], [0.1, 0.9], [0.9, 0.1]]),
                            np.array([[0.8, 0.2], [0.2, 0.8], [0.1, 0.1]]),
                            np.array([True, True, False]))
    assert out == {"typical_n": 2, "typical_agreement": 0.5}  # x 2 of 2, y 1 of 2
    with pytest.raises(Hm3Error, match="one entry per text"):
        typical_agreement(group, expert, merged, np.ones(4, bool))


def test_counting_typical_texts_without_any_known_task_texts_is_an_error():
    from hm3.check import compare_task, verdicts

    group = TaskGroup("topic", ("a", "b"), 0)
    entry = compare_task(group, np.array([[0.9, 0.1]]), np.array([[0.8, 0.2]]))
    with pytest.raises(Hm3Error, match="no texts known to be from it; give them "
                       r"\(--task-texts TASK=FILE\)"):
        verdicts({"tasks": {"topic": entry}}, {"topic": 0.9}, count="typical")


@torch.no_grad()
def plain_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    """The last hidden state averaged over non-padding tokens, with plain transformers."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1].double()
    mask = batch["attention_mask"].unsqueeze(-1).double()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def counted_report(root, count: str, tmp_path, capsys) -> tuple[dict, str]:
    """The JSON report and printed output of `hm3 check` on the family's check texts with
    `--count count` (every task passes: minimum agreement 0), after checking that the report
    says what it counted."""
    code, out, err = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                                "--count", count, "--min-agreement", "0", "--json",
                                str(tmp_path / f"{count}.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / f"{count}.json").read_text())
    assert report["counted"] == count
    return report, out


def test_check_counts_the_texts_typical_of_each_tasks_calibration_texts(fam, tmp_path, capsys):
    """`--count typical` without --task-texts: each task's typical texts are judged against
    the 40 calibration texts the merge records, in its expert's embedding space (computed here
    with plain transformers), and the verdict counts those texts only."""
    from hm3.check import typical_texts

    root, _, experts, texts = fam
    report, out = counted_report(root, "typical", tmp_path, capsys)
    merged = plain_logits(root / "merged", texts)
    offset = 0
    for task, labels in TASKS.items():
        known = (root / f"{task}.txt").read_text().splitlines()
        assert report["task_texts"][task] == {
            "texts": 40, "from": f"the merge's calibration texts ({root / f'{task}.txt'})"}
        embedded = plain_embeddings(experts[task], texts + known)
        typical = typical_texts(embedded[:len(texts)], embedded[len(texts):])
        entry = report["tasks"][task]
        assert 0 < typical.sum() < len(texts)  # the test means something
        assert entry["typical_n"] == typical.sum()
        mine = merged[:, offset:offset + len(labels)][typical]
        theirs = plain_logits(experts[task], texts)[typical]
        want = (((mine > 0) == (theirs > 0)).mean(0).min() if task == "tags"
                else (mine.argmax(1) == theirs.argmax(1)).mean())
        assert entry["typical_agreement"] == pytest.approx(want, abs=1e-9)
        assert entry["verdict_agreement"] == entry["typical_agreement"]
        assert entry["verdict_counted"] == (f"on the {typical.sum()} texts typical of the "
                                            "task's 40 texts")
        assert f"{task}: the verdict counted on the {typical.sum()} texts typical" in out
        assert f"{task}: 40 texts known to be from it, from the merge's calibration" in out
        offset += len(labels)
    assert "verdict (on the texts typical of each task's known texts): pass" in out
    # texts given for one task replace the recorded ones for that task only
    (tmp_path / "topic.txt").write_text("\n".join(texts[:10]) + "\n")
    code, _, err = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                              "--count", "typical", "--task-texts",
                              f"topic={tmp_path / 'topic.txt'}", "--min-agreement", "0",
                              "--json", str(tmp_path / "u.json")], capsys)
    assert code == 0, err
    given = json.loads((tmp_path / "u.json").read_text())["task_texts"]
    assert given["topic"] == {"texts": 10, "from": "--task-texts"}
    assert given["sentiment"]["texts"] == 40


@pytest.mark.parametrize("extra, message", [
    (["--task-texts", "topic"], "--task-texts: expected TASK=FILE, got 'topic'"),
    (["--task-texts", "nope={check}"], "--task-texts: no checked task 'nope'"),
    (["--task-texts", "topic={check}", "topic={check}"], "two files for task 'topic'"),
])
def test_bad_task_texts_exit_2_with_one_line(fam, capsys, extra, message):
    root = fam[0]
    extra = [e.format(check=root / "check.txt") for e in extra]
    code, out, err = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                                "--count", "typical", *extra], capsys)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_counting_typical_texts_of_a_merge_without_calibration_texts_needs_task_texts(
        fam, tmp_path, capsys):
    root = fam[0]
    bare = tmp_path / "bare"
    shutil.copytree(root / "merged", bare)
    (bare / "hm3_recipe.yaml").unlink()
    code, out, err = run_check([str(bare), "--texts", str(root / "check.txt"), "--count",
                                "typical"], capsys)
    assert code == 2 and out == ""
    assert ("--count typical needs texts known to be from each task, and the merge records no "
            "calibration texts of its own for sentiment, topic, tags: give --task-texts "
            "TASK=FILE for each") in err
    assert len(err.strip().splitlines()) == 1


def test_domain_texts_go_to_the_task_holding_most_of_their_nearest_known_texts():
    from hm3.check import domain_texts

    def at(*degrees):
        radians = np.radians(degrees)
        return np.stack([np.cos(radians), np.sin(radians)], 1)

    known = {"a": at(0, 5, 10), "b": at(80, 85, 90)}
    # 2 deg: a's three, then b's 80 -> 3 of 4 a; 88 deg: 3 of 4 b; 45 deg: 10 and 80 (35 deg
    # off), 5 and 85 (40 off) -> 2 and 2, no majority: in neither domain
    out = domain_texts(at(2, 88, 45), known, k=4)
    assert out["a"].tolist() == [True, False, False]
    assert out["b"].tolist() == [False, True, False]
    # k = 1: the nearest known text alone decides (30 deg: 10 is nearest)
    assert domain_texts(at(30), known, k=1)["a"].tolist() == [True]
    with pytest.raises(Hm3Error, match="need texts known to be from at least 2 tasks"):
        domain_texts(at(2), {"a": known["a"]})


def base_domains(root, base, texts) -> dict:
    """Each task's domain among `texts`: `domain_texts` on the base model's mean last hidden
    states (computed here with plain transformers) of the texts and of the 40 calibration
    texts each task's merge records."""
    from transformers import AutoModel

    from hm3.check import domain_texts

    known = {task: (root / f"{task}.txt").read_text().splitlines() for task in TASKS}
    every = texts + [t for task in TASKS for t in known[task]]
    model, tokenizer = AutoModel.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        batch = tokenizer(every, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.double()
    mask = batch["attention_mask"].unsqueeze(-1).double()
    embedded = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    references, start = {}, len(texts)
    for task in TASKS:
        references[task] = embedded[start:start + 40]
        start += 40
    return domain_texts(embedded[:len(texts)], references)


def test_check_counts_the_texts_in_each_tasks_domain_by_the_base_models_space(fam, tmp_path,
                                                                            capsys):
    """`--count domain`: each check text placed by its 10 nearest calibration texts of every
    task, in the base model's space (computed here with plain transformers), and each task's
    verdict on the texts of its domain."""
    root, base, experts, texts = fam
    report, out = counted_report(root, "domain", tmp_path, capsys)
    domains = base_domains(root, base, texts)
    merged = plain_logits(root / "merged", texts)
    offset = 0
    for task, labels in TASKS.items():
        entry, mine = report["tasks"][task], domains[task]
        assert entry["domain_n"] == mine.sum() and "typical_n" not in entry
        if mine.any():
            ours = merged[:, offset:offset + len(labels)][mine]
            theirs = plain_logits(experts[task], texts)[mine]
            want = (((ours > 0) == (theirs > 0)).mean(0).min() if task == "tags"
                    else (ours.argmax(1) == theirs.argmax(1)).mean())
            assert entry["verdict_agreement"] == pytest.approx(want, abs=1e-9)
            assert entry["verdict_counted"] == f"on the {mine.sum()} texts in the task's domain"
        offset += len(labels)
    assert sum(d.sum() for d in domains.values()) > 0
    assert "verdict (on the texts in each task's domain, by their nearest known texts)" in out

def per_label_agreement(task: str, ours: np.ndarray, theirs: np.ndarray) -> float:
    """By hand from logits: single-label, per label the expert gives the share the merged
    model gives too, averaged; multi-label (logit > 0 is on), per label the mean of the on and
    off texts' agreement (the plain agreement where the expert never changes it), the worst."""
    if task == "tags":
        on, same = theirs > 0, (ours > 0) == (theirs > 0)
        return min(np.mean([same[on[:, k], k].mean(), same[~on[:, k], k].mean()])
                   if 0 < on[:, k].sum() < len(on) else same[:, k].mean()
                   for k in range(on.shape[1]))
    given, same = theirs.argmax(1), ours.argmax(1) == theirs.argmax(1)
    return float(np.mean([same[given == c].mean() for c in np.unique(given)]))


def test_check_per_label_averages_the_domain_agreement_over_the_experts_labels(fam, tmp_path,
                                                                             capsys):
    """`--count domain --per-label`: per task, the agreement on the texts of its domain taken
    per label its expert gives there, then averaged (a multi-label task: per label the mean of
    the on and off texts' agreement, then the worst label's), recomputed here from plain
    logits and the domains of the base model's space."""
    root, base, experts, texts = fam
    domains = base_domains(root, base, texts)
    code, out, err = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                                "--count", "domain", "--per-label", "--min-agreement", "0",
                                "--json", str(tmp_path / "per-label.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "per-label.json").read_text())
    assert report["per_label"] is True and report["counted"] == "domain"
    merged = plain_logits(root / "merged", texts)
    offset, checked = 0, 0
    for task, labels in TASKS.items():
        entry, mine = report["tasks"][task], domains[task]
        assert entry["domain_n"] == mine.sum()
        ours = merged[:, offset:offset + len(labels)]
        theirs = plain_logits(experts[task], texts)
        offset += len(labels)
        assert entry["balanced_agreement"] == pytest.approx(
            per_label_agreement(task, ours, theirs), abs=1e-9)
        if not mine.any():
            continue
        assert entry["verdict_agreement"] == pytest.approx(
            per_label_agreement(task, ours[mine], theirs[mine]), abs=1e-9)
        assert entry["verdict_counted"] == (f"per label on the {entry['domain_n']} texts in "
                                            "the task's domain")
        checked += 1
    assert checked
    assert "verdict (per label the expert gives, on the texts in each task's domain" in out
    code, _, err = run_check([str(root / "merged"), "--texts", str(root / "check.txt"),
                              "--count", "confident", "--per-label"], capsys)
    assert code == 2 and "--per-label works with --count all, typical, domain, not --count " \
        "confident" in err


def test_check_model_from_python_with_its_defaults(fam):
    """`hm3.check.check_model` as a library call: every text counted, each recorded expert
    loaded; a largest drift of exactly 1 is allowed (and fails nothing); over 1 is refused."""
    from hm3.check import check_model

    root, _, experts, texts = fam
    report = check_model(root / "merged", texts[:16])
    assert report["counted"] == "all" and list(report["tasks"]) == list(TASKS)
    assert report["experts"] == {task: str(folder) for task, folder in experts.items()}
    assert report["model"] == str(root / "merged")
    loose = check_model(root / "merged", texts[:16], min_agreement=["0"], max_drift=1.0)
    assert loose["passed"] and all(e["max_drift"] == 1.0 for e in loose["tasks"].values())
    with pytest.raises(Hm3Error, match=r"^--max-drift: expected a distance in \[0, 1\], got 1\.5$"):
        check_model(root / "merged", texts[:16], max_drift=1.5)


def test_check_model_loads_every_model_with_the_options_given(fam, monkeypatch):
    """The merged model and each expert (as its task) load with the same device, max_length and
    allow_pickle: an expert truncated otherwise than the merged model would disagree for that
    reason alone."""
    import hm3.check

    root, _, experts, texts = fam
    calls = []
    real = hm3.check.load
    monkeypatch.setattr(hm3.check, "load",
                        lambda path, **options: calls.append((str(path), options))
                        or real(path, **options))
    hm3.check.check_model(root / "merged", texts[:4], max_length=7, device="cpu",
                          allow_pickle=False, batch_size=2, precision="auto")
    options = {"device": "cpu", "max_length": 7, "allow_pickle": False}
    # the precision is the merged model's alone (an export's): the experts run as they are
    assert calls == [(str(root / "merged"), {"precision": "auto", **options}),
                     *((str(folder), {"task": task, **options})
                       for task, folder in experts.items())]


def test_a_pickle_only_expert_is_checked_only_with_allow_pickle(fam, tmp_path):
    """An expert saved as pytorch_model.bin alone: refused by default (a pickle can run code),
    checked like its safetensors copy with `allow_pickle=True`."""
    from hm3.check import check_model

    root, _, experts, texts = fam
    pickled = tmp_path / "sentiment"
    shutil.copytree(experts["sentiment"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    items = [f"sentiment={pickled}"]
    with pytest.raises(Hm3Error, match="pickle"):
        check_model(root / "merged", texts[:8], experts=items)
    got = check_model(root / "merged", texts[:8], experts=items, allow_pickle=True)
    want = check_model(root / "merged", texts[:8], experts=[f"sentiment={experts['sentiment']}"])
    assert got["tasks"]["sentiment"]["agreement"] == want["tasks"]["sentiment"]["agreement"]
