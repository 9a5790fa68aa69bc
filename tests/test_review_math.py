"""The review's numbers: kappas against hand-worked examples and against scikit-learn's and statsmodels'
own; the arena's win-rate and its bootstrap interval against closed forms; the export's rules on a review
file filled through the store (no server)."""

from __future__ import annotations

import json
import math
import random

import pytest

from conftest import learnable_pairs, write_jsonl
from prefalign.errors import ConfigError, DataError
from prefalign.review.agreement import VERDICTS, cohen_kappa, counts_table, fleiss_kappa, item_outcome, majority
from prefalign.review.export import export
from prefalign.review.items import Item, from_pairs, from_samples
from prefalign.review.store import Conflict, Store
from prefalign.review.summary import agreement, arena, summarise


def test_cohen_kappa_by_hand():
    # 50 proposals, two readers (the worked example of Wikipedia's "Cohen's kappa"): both yes 20, both no 15,
    # A yes / B no 5, A no / B yes 10. p_o = 35/50 = 0.7; A says yes 25/50, B 30/50:
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a = ["yes"] * 20 + ["no"] * 15 + ["yes"] * 5 + ["no"] * 10
    b = ["yes"] * 20 + ["no"] * 15 + ["no"] * 5 + ["yes"] * 10
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(a, a) == 1.0
    assert math.isnan(cohen_kappa(["tie"] * 3, ["tie"] * 3))  # chance agreement is already total
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def test_fleiss_kappa_by_hand():
    # 10 subjects, 14 raters, 5 categories (the worked example of Wikipedia's "Fleiss' kappa"; it gives 0.210).
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    # column sums 20, 28, 39, 21, 32 of 140 ratings: sum p_j^2 = (400 + 784 + 1521 + 441 + 1024) / 140^2
    p_e = 4170 / 19600
    # sum over rows of (sum_j n_ij^2 - 14) = 828 - 140 = 688; each P_i over 14 * 13 = 182 pairs
    p_bar = 688 / 182 / 10
    assert fleiss_kappa(table) == pytest.approx((p_bar - p_e) / (1 - p_e), abs=1e-12)
    assert round(fleiss_kappa(table), 3) == 0.210
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 1], [1, 0]])  # rows of different rater counts
    assert math.isnan(fleiss_kappa([[2, 0], [2, 0]]))


def test_kappas_equal_scikit_learn_and_statsmodels():
    np = pytest.importorskip("numpy")
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(5, 60)
        a = [rng.choice(VERDICTS) for _ in range(n)]
        b = [x if rng.random() < 0.6 else rng.choice(VERDICTS) for x in a]  # correlated raters
        if len(set(a) | set(b)) > 1:
            assert cohen_kappa(a, b) == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b), abs=1e-12), trial
        raters = rng.randint(2, 6)
        per_item = [[rng.choice(VERDICTS[: rng.randint(1, 4)]) for _ in range(raters)] for _ in range(n)]
        table = counts_table(per_item)
        assert fleiss_kappa(table) == pytest.approx(inter_rater.fleiss_kappa(np.array(table)), abs=1e-12), trial


def test_majority_and_outcomes():
    assert majority(["first", "first", "tie"]) == ("first", pytest.approx(2 / 3))
    assert majority(["first", "second"]) == (None, 0.5)  # no majority on a tie for first
    assert majority(["both_bad"]) == ("both_bad", 1.0)
    # A's outcome: better 1, worse 0, tie and both bad 1/2, averaged over the annotators
    assert item_outcome(["first", "second", "tie", "both_bad"]) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_agreement_of_a_review_by_hand():
    # two annotators on 4 items: a = F F S T, b = F S S T. Cohen: p_o = 3/4, marginals a (F2 S1 T1), b (F1 S2 T1):
    # p_e = (2*1 + 1*2 + 1*1)/16 = 5/16, kappa = (12 - 5)/(16 - 5) = 7/11. Fleiss (k = 2): rows (2,0,0,0),
    # (1,1,0,0), (0,2,0,0), (0,0,2,0); p = (3, 3, 2, 0)/8, sum p^2 = 22/64; P_i = 1, 0, 1, 1 -> 3/4 = 48/64;
    # kappa = (48 - 22)/(64 - 22) = 13/21. A third annotator on item 1 only (F): Cohen with a and b over 1
    # item is undefined (one category), so it is null and left out of the mean; the item has 3 judgements,
    # not k = 2, so Fleiss leaves it out.
    verdicts = {"a": ["first", "first", "second", "tie"], "b": ["first", "second", "second", "tie"]}
    items = [{"id": i, "judgements": [{"annotator": w, "verdict": v[i]} for w, v in verdicts.items()]}
             for i in range(4)]
    items.append({"id": 4, "judgements": [{"annotator": w, "verdict": "first"} for w in ("a", "b", "c")]})
    got = agreement(items, per_item=2)
    assert got["fleiss_kappa"] == pytest.approx(13 / 21, abs=1e-12) and got["fleiss_items"] == 4
    pairs = {tuple(p["annotators"]): p for p in got["cohen_kappa_pairs"]}
    assert pairs[("a", "b")]["items"] == 5
    # with item 4 (F, F) added: p_o = 4/5, a (F3 S1 T1), b (F2 S2 T1): p_e = (6 + 2 + 1)/25, kappa = (20 - 9)/(25 - 9)
    assert pairs[("a", "b")]["kappa"] == pytest.approx(11 / 16, abs=1e-12)
    assert pairs[("a", "c")] == {"annotators": ["a", "c"], "items": 1, "kappa": None}
    assert got["cohen_kappa"] == pytest.approx(11 / 16, abs=1e-12)
    assert agreement(items, per_item=1)["fleiss_kappa"] is None


def test_arena_win_rate_uses_eval_bootstrap_and_matches_the_binomial_closed_form():
    from scipy.stats import binom

    from prefalign.eval.metrics import win_rate

    def items(verdicts):
        return [{"id": i, "judgements": [{"annotator": "p", "verdict": v}]} for i, v in enumerate(verdicts)]

    source = {"mode": "arena", "models": ["A", "B"]}
    # 40 prompts, A better on 24: the bootstrap distribution of the mean is Binomial(40, 0.6)/40, whose 2.5% and
    # 97.5% quantiles the percentile interval approximates (2000 resamples: within one step of 1/40)
    got = arena(items(["first"] * 24 + ["second"] * 16), source)
    assert got["win_rate"] == pytest.approx(0.6, abs=1e-12) and got["win_rate_items"] == 40
    lo, hi = got["win_rate_ci95"]
    assert abs(lo - binom.ppf(0.025, 40, 0.6) / 40) <= 1 / 40 and abs(hi - binom.ppf(0.975, 40, 0.6) / 40) <= 1 / 40
    assert got["win_rate_ci95"] == list(win_rate([1.0] * 24 + [0.0] * 16, seed=0)[1])  # eval's function, eval's seed
    # ties and both bad count 1/2; when every prompt is a tie the interval has no width
    assert arena(items(["tie", "both_bad"] * 5), source)["win_rate_ci95"] == [0.5, 0.5]
    assert arena(items(["first"] * 7), source)["win_rate"] == 1.0
    assert arena([], source)["win_rate"] is None


def _store(tmp_path, n=6, k=2) -> Store:
    store = Store(tmp_path / "labels.sqlite")
    store.create([Item(f"prompt {i}", f"good {i}", f"bad {i}", "first", "second", f"f:{i}") for i in range(n)],
                 {"mode": "pairs", "file": "f"}, k)
    return store


def _judge(store, who, item, verdict, **kw):
    """Judge in the item's own terms (first/second), whatever side it was shown on."""
    view = store.next_for(who)["item"]
    assert view["id"] == item, (who, view, item)
    side = {"first": "a" if view["a"] == f"good {item - 1}" else "b",
            "second": "b" if view["a"] == f"good {item - 1}" else "a"}.get(verdict, verdict)
    return store.judge(who, item, side, **kw)


def test_export_rules_and_counts(tmp_path):
    store = _store(tmp_path)
    plan = {  # item -> (alice, bob)
        1: ("first", "first"), 2: ("second", "second"), 3: ("first", "second"), 4: ("tie", "tie"),
        5: ("both_bad", "both_bad"), 6: ("first", None)}
    for item, (alice, bob) in plan.items():
        _judge(store, "alice", item, alice, better="a written answer" if item == 5 else "")
        if bob:
            _judge(store, "bob", item, bob)
    out = tmp_path / "out" / "pairs.jsonl"
    summary = export(tmp_path / "labels.sqlite", out)
    assert summary["export"]["set_aside"] == {"disagreement": 1, "tie": 1, "both_bad": 1, "incomplete": 1}
    assert summary["export"]["kept"] == 2 and summary["export"]["written_answers"] == 2
    assert summary["items_judged"] == summary["export"]["kept"] + sum(summary["export"]["set_aside"].values())
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("good 0", "bad 0"), ("bad 1", "good 1"), ("a written answer", "good 4"), ("a written answer", "bad 4")]
    assert rows[0]["agreement"] == 1.0 and rows[0]["annotators"] == ["alice", "bob"]
    quarantine = [json.loads(x) for x in out.with_name("pairs.quarantine.jsonl").read_text().splitlines()]
    assert [(q["item"], q["kind"]) for q in quarantine] == [(3, "disagreement"), (4, "tie"), (5, "both_bad"),
                                                           (6, "incomplete")]
    assert set(quarantine[0]) == {"file", "item", "field", "kind", "problem", "raw"}  # curate's quarantine lines
    # --incomplete keeps item 6; --min-agreement above 1/2 cannot rescue item 3 either way
    summary = export(tmp_path / "labels.sqlite", out, incomplete=True, min_agreement=0.75)
    assert summary["export"]["kept"] == 3 and summary["export"]["set_aside"]["disagreement"] == 1
    with pytest.raises(ConfigError):
        export(tmp_path / "labels.sqlite", out, min_agreement=1.5)


def test_min_agreement_with_three_annotators(tmp_path):
    store = _store(tmp_path, n=1, k=3)
    for who, verdict in (("a", "first"), ("b", "first"), ("c", "second")):
        _judge(store, who, 1, verdict)
    out = tmp_path / "pairs.jsonl"
    assert export(tmp_path / "labels.sqlite", out, min_agreement=0.6)["export"]["kept"] == 1  # 2/3 agree
    assert export(tmp_path / "labels.sqlite", out, min_agreement=0.7)["export"]["set_aside"] == {"disagreement": 1}


def test_store_holds_undo_and_k(tmp_path):
    store = _store(tmp_path, n=2, k=1)
    assert store.next_for("alice")["item"]["id"] == 1
    assert store.next_for("bob")["item"]["id"] == 2  # item 1 is held by alice: k = 1
    assert store.next_for("carol")["item"] is None
    with pytest.raises(Conflict):
        store.judge("carol", 1, "a")  # not shown to carol
    store.judge("alice", 1, "tie", comment="close")
    with pytest.raises(Conflict):
        store.judge("alice", 1, "a")
    assert store.next_for("alice")["item"] is None  # item 2 is bob's
    assert store.undo("alice") == {"item": 1, "verdict": "tie", "comment": "close", "better": ""}
    assert store.next_for("alice")["item"]["id"] == 1  # the undone item comes back
    assert store.undo("alice") is None
    store.hold_seconds = 0  # alice walked away: her hold no longer counts
    assert store.next_for("carol")["item"]["id"] == 1


def test_the_undone_item_comes_before_the_one_on_screen(tmp_path):
    store = _store(tmp_path, n=3, k=1)
    assert store.next_for("alice")["item"]["id"] == 1
    store.judge("alice", 1, "a")
    assert store.next_for("alice")["item"]["id"] == 2  # on screen, held
    assert store.undo("alice")["item"] == 1
    assert store.next_for("alice")["item"]["id"] == 1
    store.judge("alice", 1, "b")
    assert store.next_for("alice")["item"]["id"] == 2


def test_sides_are_randomised_and_stable(tmp_path):
    store = _store(tmp_path, n=40, k=40)
    salt = store.meta()["salt"]
    sides = [store.swapped(i, "alice", salt) for i in range(1, 41)]
    assert 8 < sum(sides) < 32  # about half of 40 (binomial: outside this with probability ~1e-4)
    assert sides == [store.swapped(i, "alice", salt) for i in range(1, 41)]
    assert sides != [store.swapped(i, "bob", salt) for i in range(1, 41)]
    view = store.next_for("alice")["item"]
    assert (view["a"], view["b"]) == (("bad 0", "good 0") if sides[0] else ("good 0", "bad 0"))


def test_items_from_files_and_bad_input(tmp_path):
    logs = []
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(3) + [{"prompt": "x", "chosen": "y"}])
    items = from_pairs(pairs, logs.append)
    assert len(items) == 3 and any("pairs.jsonl:4: rejected: missing" in line for line in logs)
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": "p", "completions": ["a", "b", "c", "d", "e"], "ended": [True] * 5},
        {"prompt": "q", "completions": ["same", "Same ", "x", "y"]},
        {"prompt": "r", "completions": "not a list"}])
    logs.clear()
    items = from_samples(samples, logs.append)
    assert [(i.first, i.second, i.first_name) for i in items] == [
        ("a", "b", "completion 1"), ("c", "d", "completion 3"), ("x", "y", "completion 3")]
    assert any("samples.jsonl:3: completions: expected a list" in line for line in logs)
    with pytest.raises(DataError, match="no items"):
        from_samples(write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "completions": ["a"]}]), logs.append)
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(DataError, match="unpaired"):
        from_pairs(kto, logs.append)
    (tmp_path / "junk.sqlite").write_text("not a database at all, long enough to be read as a header")
    with pytest.raises(DataError, match="not a review file"):
        Store(tmp_path / "junk.sqlite")


def test_summary_keys_are_documented(tmp_path):
    from test_metric_docs import documented, undocumented

    store = _store(tmp_path, n=2, k=2)
    _judge(store, "alice", 1, "first")
    meta = store.meta()
    meta["source"] = {"mode": "arena", "models": ["A", "B"]}
    summary = export(tmp_path / "labels.sqlite", tmp_path / "pairs.jsonl")
    keys = set(summary) | set(summarise(store.items_with_judgements(), meta)) | {
        f"export/{k}" for k in summary["export"]}
    assert undocumented(keys, documented()) == set()


def test_a_judgement_given_again_after_an_undo_is_flagged(tmp_path):
    """Saving reveals which answer was which; an undo lets the annotator judge the item again knowing it.
    Allowed (undo is for slips), but the new judgement is flagged and counted in the summary."""
    store = _store(tmp_path, n=3, k=1)
    _judge(store, "alice", 1, "first")
    assert store.undo("alice")["item"] == 1
    _judge(store, "alice", 1, "second")
    _judge(store, "alice", 2, "first")
    flags = [(it["id"], j["revised_after_reveal"]) for it in store.items_with_judgements() for j in it["judgements"]]
    assert flags == [(1, True), (2, False)]
    summary = export(tmp_path / "labels.sqlite", tmp_path / "pairs.jsonl")
    assert summary["revised_after_reveal"] == 1 and summary["blinded"] is False


def test_a_file_from_before_the_flag_opens(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)  # the judgements table as the first version wrote it
    con.executescript("""
        CREATE TABLE items (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, first TEXT NOT NULL, second TEXT NOT NULL,
            first_name TEXT NOT NULL, second_name TEXT NOT NULL, source TEXT NOT NULL);
        CREATE TABLE judgements (id INTEGER PRIMARY KEY AUTOINCREMENT, item INTEGER NOT NULL REFERENCES items(id),
            annotator TEXT NOT NULL, verdict TEXT NOT NULL, swapped INTEGER NOT NULL, comment TEXT NOT NULL,
            better TEXT NOT NULL, created REAL NOT NULL, UNIQUE (item, annotator));
        INSERT INTO items VALUES (1, '"p"', '"a"', '"b"', 'A', 'B', 'f:1');
        INSERT INTO judgements (item, annotator, verdict, swapped, comment, better, created)
            VALUES (1, 'alice', 'first', 0, '', '', 0);""")
    con.close()
    store = Store(path)
    assert [j["revised_after_reveal"] for j in store.items_with_judgements()[0]["judgements"]] == [False]


def test_the_summary_blinded(tmp_path):
    store = _store(tmp_path, n=2, k=1)
    _judge(store, "alice", 1, "first")
    meta = {**store.meta(), "source": {"mode": "arena", "models": ["A", "B"]}}
    blind = summarise(store.items_with_judgements(), meta, blind=True)
    assert blind["blinded"] is True and not {"verdicts", "model", "win_rate", "win_rate_baseline"} & set(blind)
    full = summarise(store.items_with_judgements(), meta)
    assert full["verdicts"]["first"] == 1 and full["model"] == "A" and full["win_rate"] == 1.0
