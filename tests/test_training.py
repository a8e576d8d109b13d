"""train_bi / train_cross on a toy BEIR set with tiny random BERTs: every loss trains, runs are complete and
resumable, bad input fails before any run directory exists, and a collapsed reranker is reported."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_beir
from stagewise.data.loaders import TrainingExamples
from stagewise.errors import DataError, StagewiseError
from stagewise.training.bi import train_bi
from stagewise.training.config import BiTrainConfig, CrossTrainConfig
from stagewise.training.cross import train_cross
from stagewise.training.evaluators import detect_collapse, health_warning
from stagewise.training.examples import mine_from_first_stage

# --------------------------------------------------------------------------------------------
# Toy data: 24 documents on distinct topics; each query shares words with its one relevant document
# --------------------------------------------------------------------------------------------

TOPICS = [
    ("Cats", "Cats are small furry pets that purr and chase mice."),
    ("Dogs", "Dogs are loyal pets that bark and fetch sticks."),
    ("Python", "Python is a programming language with dynamic typing."),
    ("Rust", "Rust is a systems language focused on memory safety."),
    ("Tea", "Tea is a hot drink brewed from dried leaves."),
    ("Coffee", "Coffee is a drink brewed from roasted beans."),
    ("Volcanoes", "Volcanoes erupt molten lava and ash."),
    ("Oceans", "Oceans hold salty water and deep currents."),
    ("Piano", "The piano is an instrument with black and white keys."),
    ("Guitar", "The guitar is an instrument with six strings."),
    ("Football", "Football players kick a ball into the goal."),
    ("Tennis", "Tennis players hit a ball over the net with rackets."),
    ("Moon", "The moon orbits the earth and causes tides."),
    ("Sun", "The sun is a star that gives heat and light."),
    ("Bread", "Bread is baked from flour, yeast and water."),
    ("Cheese", "Cheese is made by curdling milk."),
    ("Trains", "Trains run on rails between stations."),
    ("Planes", "Planes fly with wings and jet engines."),
    ("Roses", "Roses are flowers with thorns and petals."),
    ("Oak", "The oak is a tree that grows acorns."),
    ("Snow", "Snow falls as frozen flakes in winter."),
    ("Deserts", "Deserts are dry lands of sand and dunes."),
    ("Chess", "Chess is a board game with kings and pawns."),
    ("Bees", "Bees make honey and pollinate flowers."),
]
TRAIN_QUERIES = [  # t{i} -> d{i}
    "pets that purr", "pets that bark", "dynamic typing language", "memory safety language",
    "drink brewed from leaves", "drink from roasted beans", "molten lava and ash", "salty water currents",
    "instrument with keys", "instrument with six strings", "kick a ball into the goal", "rackets and net",
    "moon causes tides", "star that gives heat",
]
DEV_QUERIES = {"v0": ("flour and yeast", "d14"), "v1": ("curdling milk", "d15"),
               "v2": ("rails between stations", "d16"),
               "v3": ("wings and jet engines", "d17"), "v4": ("board game with kings", "d22")}
DOCS = [f"{title} {text}" for title, text in TOPICS]  # what a model reads: Document.full_text()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny models are ~40x faster on one thread than on two busy ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    corpus = [{"_id": f"d{i}", "title": t, "text": x} for i, (t, x) in enumerate(TOPICS)]
    queries = [{"_id": f"t{i}", "text": q} for i, q in enumerate(TRAIN_QUERIES)]
    queries += [{"_id": q, "text": text} for q, (text, _) in DEV_QUERIES.items()]
    qrels = {"train": [(f"t{i}", f"d{i}", 1) for i in range(len(TRAIN_QUERIES))],
             "dev": [(q, d, 1) for q, (_, d) in DEV_QUERIES.items()]}
    return write_beir(tmp_path_factory.mktemp("data") / "toy", corpus, queries, qrels)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Training files: 0/1-scored pairs (CSV and JSONL), graded pairs, and too few pairs."""
    folder = tmp_path_factory.mktemp("files")
    binary = [(q, DOCS[i], 1) for i, q in enumerate(TRAIN_QUERIES)]
    binary += [(q, DOCS[(i + 12) % 24], 0) for i, q in enumerate(TRAIN_QUERIES)]
    graded = [(q, DOCS[i], 1.0) for i, q in enumerate(TRAIN_QUERIES)]
    graded += [(q, DOCS[i ^ 1], 0.5) for i, q in enumerate(TRAIN_QUERIES)]  # the sibling topic: half relevant
    graded += [(q, DOCS[(i + 12) % 24], 0.0) for i, q in enumerate(TRAIN_QUERIES)]
    return {
        "binary_csv": _write_csv(folder / "binary.csv", ["text1", "text2", "score"], binary),
        "binary_jsonl": _write_jsonl(folder / "binary.jsonl",
                                     [{"sentence1": a, "sentence2": b, "label": s} for a, b, s in binary]),
        "graded_csv": _write_csv(folder / "graded.csv", ["text1", "text2", "score"], graded),
        "few_pairs": _write_jsonl(folder / "few.jsonl",
                                  [{"query": q, "positive": DOCS[i]} for i, q in enumerate(TRAIN_QUERIES[:5])]),
    }


def bi_config(toy, model, **overrides) -> BiTrainConfig:
    options = dict(data=str(toy), model=str(model), batch_size=4, epochs=3, learning_rate=1e-3, warmup_ratio=0.0,
                   logging_steps=1, dev_corpus_size=10, max_seq_length=64, hard_negatives="none",
                   early_stopping_patience=None)
    return BiTrainConfig(**{**options, **overrides})


def cross_config(toy, model, **overrides) -> CrossTrainConfig:
    options = dict(data=str(toy), model=str(model), batch_size=4, epochs=1, learning_rate=1e-3, warmup_ratio=0.0,
                   logging_steps=1, max_length=64, depth=5, hard_negatives=2, random_negatives=1,
                   early_stopping_patience=None)
    return CrossTrainConfig(**{**options, **overrides})


def _evaluations(run: Path) -> list[dict]:
    """The dev evaluations in a run's metrics.jsonl (its other lines are the logged training losses)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "dev_ndcg@10" in m]


def _epoch_means(result: dict, epochs: int) -> tuple[float, float]:
    """Mean logged loss over the first epoch and over the last one."""
    losses = [loss for _, loss in result["train"]["loss_history"]]
    per_epoch = result["train"]["steps"] // epochs
    assert per_epoch >= 2 and len(losses) == result["train"]["steps"]
    return float(np.mean(losses[:per_epoch])), float(np.mean(losses[-per_epoch:]))


@pytest.fixture(scope="module")
def bi_run(toy, tiny_bi_encoder, tmp_path_factory):
    """A finished tiny train-bi run (its own cache: the per-test cache fixture is function-scoped)."""
    tmp = tmp_path_factory.mktemp("bi-run")
    config = bi_config(toy, tiny_bi_encoder, epochs=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STAGEWISE_CACHE", str(tmp / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        train_bi(config, tmp / "run")
    return tmp / "run", config


# --------------------------------------------------------------------------------------------
# Bi-encoder: every loss path
# --------------------------------------------------------------------------------------------

BI_CASES = {
    "mnrl-pairs": dict(loss="mnrl", hard_negatives="none"),
    "mnrl-bm25": dict(hard_negatives="bm25", range_min=0, range_max=10),
    "mnrl-model": dict(hard_negatives="model", range_min=0, range_max=10, relative_margin=None),
    "cached-mnrl": dict(loss="cached-mnrl"),
    "gist": dict(loss="gist"),
    "triplet": dict(loss="triplet", hard_negatives="bm25", range_min=0, range_max=10),
    "contrastive": dict(loss="contrastive", train_file="binary_csv"),
    "online-contrastive": dict(train_file="binary_jsonl"),  # the default for 0/1 scores
    "cosent": dict(train_file="graded_csv", epochs=2),  # the default for graded scores
    "margin-mse": dict(loss="margin-mse", hard_negatives="bm25", range_min=0, range_max=10, teacher="teacher"),
}
EXPECTED_LOSS = {"mnrl-pairs": "mnrl", "mnrl-bm25": "mnrl", "mnrl-model": "mnrl"}
EXPECTED_COLUMNS = {
    "mnrl-pairs": ["anchor", "positive"], "mnrl-bm25": ["anchor", "positive", "negative_1"],
    "mnrl-model": ["anchor", "positive", "negative_1"], "cached-mnrl": ["anchor", "positive"],
    "gist": ["anchor", "positive"], "triplet": ["anchor", "positive", "negative_1"],
    "contrastive": ["text1", "text2", "score"], "online-contrastive": ["text1", "text2", "score"],
    "cosent": ["text1", "text2", "score"], "margin-mse": ["anchor", "positive", "negative", "label"],
}


@pytest.mark.parametrize("case", list(BI_CASES))
def test_bi_loss_trains_and_writes_a_complete_run(case, toy, files, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    overrides = dict(BI_CASES[case])
    if "train_file" in overrides:
        overrides["train_file"] = str(files[overrides["train_file"]])
    if overrides.get("teacher"):
        overrides["teacher"] = str(tiny_cross_encoder)
    config = bi_config(toy, tiny_bi_encoder, **overrides)
    out = tmp_path / "run"
    result = train_bi(config, out)

    loss_name = EXPECTED_LOSS.get(case, case)
    assert result["loss"] == loss_name
    first, last = _epoch_means(result, int(config.epochs))
    assert last < first, result["train"]["loss_history"]
    assert all(math.isfinite(loss) for _, loss in result["train"]["loss_history"])

    # the model: plain sentence-transformers loads it, with its generated model card
    model_dir = out / "model"
    assert Path(result["model"]) == model_dir and (model_dir / "README.md").is_file()
    embeddings = SentenceTransformer(str(model_dir), device="cpu").encode(["pets that purr", DOCS[0]])
    assert embeddings.shape == (2, 32) and np.isfinite(embeddings).all()

    # the run directory
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["command"] == "train-bi" and config_json["loss"] == loss_name
    assert config_json["seed"] == 42 and len(config_json["dataset_fingerprint"]) == 16
    metrics = _evaluations(out)
    assert len(metrics) == int(config.epochs)  # one dev evaluation per epoch
    assert all(0.0 <= m["dev_ndcg@10"] <= 1.0 for m in metrics)
    train_data = json.loads((out / "train_data.json").read_text())
    assert list(train_data) == EXPECTED_COLUMNS[case]
    saved = json.loads((out / "result.json").read_text())
    assert saved["wall_seconds"] > 0 and saved["train"]["steps"] == result["train"]["steps"]
    assert set(saved["dev"]) == {"base", "fine-tuned"}
    assert all(0.0 <= saved["dev"][k]["ndcg@10"] <= 1.0 for k in ("base", "fine-tuned"))

    if "negative_1" in train_data:  # mined: never the example's own positive
        assert len(train_data["anchor"]) > 0
        assert all(n != p for n, p in zip(train_data["negative_1"], train_data["positive"]))
    if case == "margin-mse":  # the teacher's margins are the labels
        assert len(set(train_data["label"])) > 1
    if case == "mnrl-bm25":
        assert result["train"]["mined_from"] == "bm25"


# --------------------------------------------------------------------------------------------
# Cross-encoder: every loss, init strategies, mining, collapse
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss,train_file", [(None, None), ("mse", "graded_csv"), ("cross-entropy", None),
                                             ("listnet", None), ("lambda", None)])
def test_cross_loss_trains_and_saves_a_loadable_cross_encoder(loss, train_file, toy, files, tiny_cross_encoder,
                                                              tmp_path):
    from sentence_transformers import CrossEncoder

    config = cross_config(toy, tiny_cross_encoder, loss=loss, train_file=str(files[train_file]) if train_file else None)
    out = tmp_path / "run"
    result = train_cross(config, out)

    assert result["loss"] == (loss or "bce") and result["init"] == "base" and result["init_warning"] is None
    assert result["train"]["steps"] > 0 and result["train"]["loss_history"]
    assert all(math.isfinite(v) for _, v in result["train"]["loss_history"])
    scores = CrossEncoder(str(out / "model")).predict([("pets that purr", DOCS[0]), ("pets that purr", DOCS[5])])
    assert np.asarray(scores).shape == (2,) and np.isfinite(scores).all()
    health = result["dev"]["health"]
    assert set(health) >= {"collapsed", "reasons", "mean_score_std"}
    saved = json.loads((out / "result.json").read_text())
    assert saved["wall_seconds"] > 0 and saved["dev"]["first_stage"] == result["dev"]["first_stage"]
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["command"] == "train-cross" and config_json["loss"] == (loss or "bce")
    assert config_json["first_stage"] == "bm25" and config_json["init"] == "base"
    assert (out / "metrics.jsonl").read_text().count("dev_ndcg@10") == 1

    data = json.loads((out / "train_data.json").read_text())
    if loss in (None, "mse"):
        assert list(data) == ["query", "document", "label"]
    if loss is None:  # mined: per query 1 positive, 2 hard negatives (bm25 top 5) and 1 random
        assert len(data["query"]) == 4 * len(TRAIN_QUERIES) and sum(data["label"]) == len(TRAIN_QUERIES)
    if loss in ("listnet", "lambda"):
        assert all(labels[0] == 1.0 and sum(labels) == 1.0 for labels in data["labels"])


def _pooling_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and "pooling" in str(w.message)]


def test_cross_init_base_from_a_cross_encoder_warns_nothing(toy, tiny_cross_encoder, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = train_cross(cross_config(toy, tiny_cross_encoder), tmp_path / "run")
    assert not _pooling_warnings(record)
    config_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config_json["init"] == "base" and config_json["init_warning"] is None
    assert result["init_model"] == str(tiny_cross_encoder)


@pytest.mark.parametrize("init", ["base", "same-as-bi", "from-finetuned-bi"])
def test_cross_init_from_a_bi_encoder_warns_and_records_it(init, toy, tiny_bi_encoder, bi_run, tmp_path):
    from sentence_transformers import CrossEncoder

    run_path, bi = bi_run
    config = cross_config(toy, tiny_bi_encoder, init=init, bi_run=None if init == "base" else str(run_path))
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = train_cross(config, out)
    found = _pooling_warnings(record)
    assert len(found) == 1 and "bi-encoder" in found[0]

    expected_init = {"base": str(tiny_bi_encoder), "same-as-bi": bi.model,
                     "from-finetuned-bi": str(run_path / "model")}[init]
    assert result["init"] == init and result["init_model"] == expected_init
    saved = json.loads((out / "result.json").read_text())
    config_json = json.loads((out / "config.json").read_text())
    assert saved["init_warning"] == config_json["init_warning"] == found[0]
    assert config_json["init"] == init and config_json["init_model"] == expected_init
    # with a bi run, its fine-tuned model is the default first stage
    assert config_json["first_stage"] == ("bm25" if init == "base" else str(run_path / "model"))
    cross = CrossEncoder(str(out / "model"))
    assert np.isfinite(cross.predict([("pets that purr", DOCS[0])])).all()


class StubFirstStage:
    """A first stage with a fixed ranking per query; returns it all, whatever k, to show the miner cuts at depth."""

    name = "stub"

    def __init__(self, rankings: dict[str, list[str]]):
        self.rankings = rankings

    def retrieve(self, queries, k):
        return [[(d, 1.0 / (r + 1)) for r, d in enumerate(self.rankings[q])] for q in queries]


def _mining_setup():
    texts = {f"d{i}": f"text {i}" for i in range(12)}
    examples = TrainingExamples("pairs", {"anchor": ["qa", "qb", "qb"], "positive": ["text 0", "text 5", "text 6"]})
    rankings = {"qa": [f"d{i}" for i in range(12)],  # its positive ranked first
                "qb": ["d1", "d5", "d2", "d3", "d6", "d4", "d7", "d8", "d9", "d10", "d11", "d0"]}
    return texts, examples, StubFirstStage(rankings)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mining_takes_negatives_from_the_first_stage_top_depth_plus_random_ones(seed):
    texts, examples, stage = _mining_setup()
    groups = mine_from_first_stage(examples, stage, texts, depth=4, hard=2, random_count=2, seed=seed)
    assert set(groups) == {"qa", "qb"}
    positives = {"qa": {"text 0"}, "qb": {"text 5", "text 6"}}
    for q, group in groups.items():
        labelled = [t for t, label in group if label == 1]
        negatives = [t for t, label in group if label == 0]
        assert set(labelled) == positives[q]
        assert not set(negatives) & positives[q]
        assert len(negatives) == len(set(negatives)) == 4  # 2 hard + 2 random, no repeats
        top = [texts[d] for d in stage.rankings[q][:4] if texts[d] not in positives[q]]
        assert negatives[:2] == top[:2]  # the hard ones: the first stage's best-ranked non-positives
    # qb's positive 'text 5' is ranked 2nd: it is skipped, not used as a negative
    assert [t for t, label in groups["qb"] if label == 0][:2] == ["text 1", "text 2"]


def test_skip_top_takes_hard_negatives_from_below_the_first_stage_top_ranks():
    texts, examples, stage = _mining_setup()
    groups = mine_from_first_stage(examples, stage, texts, depth=6, hard=2, random_count=0, seed=0, range_min=2)
    for q, group in groups.items():
        skipped = {texts[d] for d in stage.rankings[q][:2]}
        negatives = [t for t, label in group if label == 0]
        assert negatives and not set(negatives) & skipped
        assert negatives == [texts[d] for d in stage.rankings[q][2:6] if texts[d] not in
                             {t for t, label in group if label == 1}][:2]


def test_mining_without_random_negatives_never_looks_past_depth():
    texts, examples, stage = _mining_setup()
    groups = mine_from_first_stage(examples, stage, texts, depth=3, hard=5, random_count=0, seed=0)
    # qa: top 3 = d0 (positive), d1, d2; qb: top 3 = d1, d5 (positive), d2
    assert groups["qa"] == [("text 0", 1), ("text 1", 0), ("text 2", 0)]
    assert groups["qb"] == [("text 5", 1), ("text 6", 1), ("text 1", 0), ("text 2", 0)]
    shallow = mine_from_first_stage(examples, stage, texts, depth=4, hard=1, random_count=0, seed=0, range_min=1)
    assert shallow["qa"] == [("text 0", 1), ("text 1", 0)]
    assert shallow["qb"] == [("text 5", 1), ("text 6", 1), ("text 2", 0)]


def test_detect_collapse():
    flat = detect_collapse([np.full(5, 0.7), np.full(5, 0.7)], reranked_ndcg=0.6, first_stage_ndcg=0.5)
    assert flat["collapsed"] and not flat["no_gain"] and len(flat["reasons"]) == 1
    assert "near-constant" in flat["reasons"][0]
    no_gain = detect_collapse([np.array([3.0, 1.0, -2.0])], reranked_ndcg=0.5, first_stage_ndcg=0.5)
    assert no_gain["no_gain"] and not no_gain["collapsed"] and "no better" in no_gain["reasons"][0]
    both = detect_collapse([np.zeros(3)], reranked_ndcg=0.2, first_stage_ndcg=0.5)
    assert both["collapsed"] and both["no_gain"] and len(both["reasons"]) == 2
    healthy = detect_collapse([np.array([3.0, 1.0, -2.0]), np.array([0.5, 0.1])], 0.8, 0.5)
    assert not healthy["collapsed"] and not healthy["no_gain"] and healthy["reasons"] == []
    assert healthy["mean_score_std"] > 0.1
    # a collapse is a failure; reranking alone below the first stage is not one yet (fusion may still add)
    assert health_warning(flat).startswith("the reranker did not learn") and health_warning(healthy) is None
    assert health_warning(both).startswith("the reranker did not learn")
    assert health_warning(no_gain).startswith("reranking alone does not beat") and "fused" in health_warning(no_gain)
    # a first stage that is already perfect leaves nothing to gain: that is not a failure of the reranker
    perfect = detect_collapse([np.array([3.0, 1.0])], reranked_ndcg=1.0, first_stage_ndcg=1.0)
    assert not perfect["no_gain"] and not perfect["collapsed"]
    assert detect_collapse([], 0.9, 0.5)["collapsed"]  # no scores at all is no evidence of reranking


@pytest.fixture
def constant_cross_encoder(tiny_cross_encoder, tmp_path) -> Path:
    """The tiny cross-encoder with a zeroed scoring head: the same score for every pair."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tiny_cross_encoder)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(0.25)
    out = tmp_path / "constant-cross"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_cross_encoder).save_pretrained(out)
    return out


def test_a_collapsed_reranker_is_reported_and_warned(toy, constant_cross_encoder, tmp_path):
    config = cross_config(toy, constant_cross_encoder, learning_rate=0.0)
    with pytest.warns(UserWarning, match="did not learn to rerank"):
        result = train_cross(config, tmp_path / "run")
    health = result["dev"]["health"]
    assert health["collapsed"] and health["mean_score_std"] < 1e-3
    assert any("near-constant" in r for r in health["reasons"])
    assert json.loads((tmp_path / "run" / "result.json").read_text())["dev"]["health"]["collapsed"] is True


# --------------------------------------------------------------------------------------------
# Bad input: a clear error before any run directory exists
# --------------------------------------------------------------------------------------------

BAD_BI = {
    "too few examples": (dict(train_file="few_pairs"), DataError, "at least 8"),
    "missing train split": (dict(train_split="nope"), DataError, "no split 'nope'"),
    "scored pairs with mnrl": (dict(train_file="binary_csv", loss="mnrl"), StagewiseError, "scored pairs"),
    "pairs with cosent": (dict(loss="cosent"), StagewiseError, "needs scored pairs"),
    "graded with online-contrastive": (dict(train_file="graded_csv", loss="online-contrastive"), StagewiseError,
                                       "0/1 labels"),
    "unknown loss": (dict(loss="nope"), StagewiseError, "unknown bi-encoder loss 'nope'"),
    "cross-encoder as base": (dict(model="CROSS"), StagewiseError, "is a cross-encoder"),
    "margin-mse without teacher": (dict(loss="margin-mse", hard_negatives="bm25"), StagewiseError, "--teacher"),
    "triplet without negatives": (dict(loss="triplet", hard_negatives="none"), StagewiseError, "needs negatives"),
    "unknown mining": (dict(hard_negatives="random"), StagewiseError, "--hard-negatives"),
}


@pytest.mark.parametrize("case", list(BAD_BI))
def test_bad_bi_input_fails_before_the_run_directory(case, toy, files, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    overrides, error, message = BAD_BI[case]
    overrides = dict(overrides)
    if "train_file" in overrides:
        overrides["train_file"] = str(files[overrides["train_file"]])
    model = tiny_cross_encoder if overrides.pop("model", None) == "CROSS" else tiny_bi_encoder
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train_bi(bi_config(toy, model, **overrides), out)
    assert not out.exists()


@pytest.fixture
def not_a_bi_run(tmp_path) -> Path:
    run = tmp_path / "cross-run"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"command": "train-cross"}))
    return run


BAD_CROSS = {
    "too few examples": (dict(train_file="few_pairs"), DataError, "at least 8"),
    "missing train split": (dict(train_split="nope"), DataError, "no split 'nope'"),
    "unknown loss": (dict(loss="nope"), StagewiseError, "unknown cross-encoder loss 'nope'"),
    "listwise loss on scored pairs": (dict(loss="listnet", train_file="graded_csv"), StagewiseError, "scored pairs"),
    "same-as-bi without bi_run": (dict(init="same-as-bi"), StagewiseError, "needs --bi-run"),
    "from-finetuned-bi without bi_run": (dict(init="from-finetuned-bi"), StagewiseError, "needs --bi-run"),
    "bi_run of another command": (dict(init="same-as-bi", bi_run="NOT_BI"), StagewiseError, "not a train-bi run"),
    "bi_run that is no run": (dict(init="from-finetuned-bi", bi_run="EMPTY"), StagewiseError,
                              "not a finished train-bi run"),
    "unknown init": (dict(init="random"), StagewiseError, "--init must be one of"),
    "zero depth": (dict(depth=0), StagewiseError, "--depth"),
}


@pytest.mark.parametrize("case", list(BAD_CROSS))
def test_bad_cross_input_fails_before_the_run_directory(case, toy, files, tiny_cross_encoder, not_a_bi_run, tmp_path):
    overrides, error, message = BAD_CROSS[case]
    overrides = dict(overrides)
    if "train_file" in overrides:
        overrides["train_file"] = str(files[overrides["train_file"]])
    if overrides.get("bi_run") == "NOT_BI":
        overrides["bi_run"] = str(not_a_bi_run)
    if overrides.get("bi_run") == "EMPTY":
        overrides["bi_run"] = str(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train_cross(cross_config(toy, tiny_cross_encoder, **overrides), out)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def test_a_finished_run_is_not_overwritten_and_resumes_only_with_the_same_config(bi_run):
    run_path, config = bi_run
    snapshot = {p: p.read_bytes() for p in run_path.rglob("*") if p.is_file()}
    with pytest.raises(StagewiseError, match="already holds a run"):
        train_bi(config, run_path)
    changed = BiTrainConfig(**{**config.__dict__, "learning_rate": 5e-4})
    with pytest.raises(StagewiseError, match="changed: learning_rate"):
        train_bi(changed, run_path, resume=True)
    assert {p: p.read_bytes() for p in run_path.rglob("*") if p.is_file()} == snapshot


def test_an_interrupted_run_resumes_from_its_checkpoint_on_the_same_data(toy, tiny_bi_encoder, tmp_path, monkeypatch):
    import stagewise.training.bi as bi
    import stagewise.training.fit as fit

    config = bi_config(toy, tiny_bi_encoder, hard_negatives="bm25", range_min=0, range_max=10, epochs=2)
    reference = train_bi(config, tmp_path / "uninterrupted")

    original = fit._progress_with_loss

    def interrupting():
        class InterruptAfterFirstCheckpoint(original()):
            def on_save(self, args, state, control, **kwargs):
                raise KeyboardInterrupt

        return InterruptAfterFirstCheckpoint

    out = tmp_path / "run"
    monkeypatch.setattr(fit, "_progress_with_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_bi(config, out)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (out / "result.json").exists()
    train_data = (out / "train_data.json").read_bytes()

    monkeypatch.setattr(fit, "_progress_with_loss", original)

    def no_mining(*args, **kwargs):
        raise AssertionError("a resumed run must reuse train_data.json, not mine again")

    monkeypatch.setattr(bi, "mine_from_first_stage", no_mining)
    with pytest.raises(StagewiseError, match="already holds a run"):
        train_bi(config, out)
    result = train_bi(config, out, resume=True)
    assert result["train"]["steps"] == reference["train"]["steps"]
    steps = [step for step, _ in result["train"]["loss_history"]]
    assert steps == list(range(1, reference["train"]["steps"] + 1))  # the first epoch's log kept, not redone
    assert (out / "train_data.json").read_bytes() == train_data
    assert len(_evaluations(out)) == 2  # one evaluation per epoch, none repeated
    assert json.loads((out / "result.json").read_text())["train"]["steps"] == reference["train"]["steps"]
    _drop_log_handlers_under(tmp_path)


def _drop_log_handlers_under(folder: Path) -> None:
    """An interrupted run never closes its log.txt handler on the root logger (RunDir.finish is not reached)."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder):
            root.removeHandler(handler)
            handler.close()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_train_bi_and_cross(toy, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    from stagewise.cli import app

    out = tmp_path / "bi"
    result = runner.invoke(app, ["train", "bi", "--model", str(tiny_bi_encoder), "--data", str(toy),
                                 "--hard-negatives", "none", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
                                 "--max-seq-length", "64", "--dev-corpus-size", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"model: {out / 'model'}" in result.output.replace("\n", "")
    assert (out / "model" / "modules.json").is_file() and (out / "result.json").is_file()

    out = tmp_path / "cross"
    result = runner.invoke(app, ["train", "cross", "--model", str(tiny_cross_encoder), "--data", str(toy),
                                 "--depth", "5", "--hard-negatives", "2", "--random-negatives", "1", "--epochs", "1",
                                 "--batch-size", "4", "--max-length", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"model: {out / 'model'}" in result.output.replace("\n", "")
    assert (out / "model" / "config.json").is_file() and (out / "result.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["train", "bi", "--loss", "nope"], "unknown bi-encoder loss 'nope'"),
    (["train", "bi", "--loss", "margin-mse", "--hard-negatives", "bm25"], "--teacher"),
    (["train", "cross", "--init", "same-as-bi"], "needs --bi-run"),
    (["train", "cross", "--train-split", "nope"], "no split 'nope'"),
    (["train", "cross", "--pretrain-queries", "-1"], "'--pretrain-queries'"),  # click's range: one line too
    (["train", "cross", "--pretrain-queries", "10", "--pretrain-kind", "summary"], "--pretrain-kind must be one of"),
    (["train", "cross", "--pretrain-queries", "10"], "pseudo-query"),  # the toy's one-line texts give none
    (["train", "cross", "--skip-top", "-2"], "'--skip-top'"),
    (["train", "cross", "--pos-weight", "0"], "'--pos-weight': must be greater than 0"),
])
def test_cli_bad_training_input_is_one_line_and_exit_2(args, message, toy, tiny_bi_encoder, tiny_cross_encoder,
                                                       tmp_path):
    from stagewise.cli import app

    model = tiny_bi_encoder if args[1] == "bi" else tiny_cross_encoder
    out = tmp_path / "run"
    result = runner.invoke(app, [*args, "--model", str(model), "--data", str(toy), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize("eval_steps", [None, 1000])  # evaluating per epoch, or every N steps
def test_a_time_limit_stops_training_after_a_last_evaluation(eval_steps, toy, tiny_bi_encoder, tmp_path):
    """``max_seconds`` (model selection's share of its time budget) stops the loop, evaluates and keeps the best."""
    config = bi_config(toy, tiny_bi_encoder, epochs=20, max_seconds=1e-6, eval_steps=eval_steps)
    result = train_bi(config, tmp_path / "run")
    train = result["train"]
    assert train["stopped_at_time_limit"] and train["steps"] == 1 < train["max_steps"]
    evaluations = _evaluations(tmp_path / "run")
    assert [e["steps"] for e in evaluations] == [1]  # the last evaluation, at the step it stopped
    assert train["best_dev_ndcg@10"] == pytest.approx(evaluations[0]["dev_ndcg@10"])
    unlimited = train_bi(bi_config(toy, tiny_bi_encoder, epochs=1), tmp_path / "unlimited")["train"]
    assert not unlimited["stopped_at_time_limit"] and unlimited["steps"] == unlimited["max_steps"]


def test_a_static_embedding_model_trains_at_its_own_learning_rate(toy, tmp_path):
    from stagewise.models.specs import resolve_model

    try:
        resolve_model("static-64")
    except StagewiseError:
        pytest.skip("static-64 is not installed")
    train_bi(bi_config(toy, "static-64", epochs=1, learning_rate=None, max_seq_length=None), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["learning_rate"] == 0.2


# --------------------------------------------------------------------------------------------
# The loss's course: logged often enough to show it, printed and stored; our progress bar, not tqdm
# --------------------------------------------------------------------------------------------


def _logged_losses(run: Path, phase: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m.get("phase") == phase and "loss" in m]


def test_the_loss_is_logged_often_enough_to_show_its_course(toy, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    """By default every ceil(steps / 20) steps: every step of the tiny bi run (8 steps), every 2nd of the cross
    run (28 steps); the logged values are the ones result.json and metrics.jsonl keep."""
    from stagewise.training.config import LOSS_POINTS

    for kind, train, config in (("bi", train_bi, bi_config(toy, tiny_bi_encoder, epochs=2, logging_steps=None)),
                                ("cross", train_cross, cross_config(toy, tiny_cross_encoder, epochs=2,
                                                                    logging_steps=None))):
        result = train(config, tmp_path / kind)["train"]
        every = math.ceil(result["steps"] / LOSS_POINTS)
        assert result["steps"] >= 4 and (every == 1 or kind == "cross"), result
        assert [step for step, _ in result["loss_history"]] == list(range(every, result["steps"] + 1, every)), kind
        assert result["loss_first"] != result["loss_last"]  # the course, not one value twice
        stored = _logged_losses(tmp_path / kind)
        assert [(m["steps"], m["loss"]) for m in stored] == [tuple(h) for h in result["loss_history"]], kind


def test_a_long_run_logs_its_loss_about_twenty_times(tmp_path):
    from types import SimpleNamespace

    from sentence_transformers import SentenceTransformerTrainingArguments
    from transformers.trainer_callback import TrainerState

    from stagewise.training.config import LOSS_POINTS
    from stagewise.training.fit import training_arguments

    args = training_arguments(SentenceTransformerTrainingArguments, BiTrainConfig(), SimpleNamespace(path=tmp_path),
                               False, {})
    assert args.disable_tqdm
    for max_steps, every in ((1000, 50), (30, 2), (7, 1)):
        state = TrainerState()
        state.compute_steps(args, max_steps)
        assert state.logging_steps == every and max_steps // every <= LOSS_POINTS


def test_cli_training_prints_the_loss_course_on_our_bar(toy, tiny_bi_encoder, tmp_path):
    from stagewise.cli import app

    result = runner.invoke(app, ["train", "bi", "--model", str(tiny_bi_encoder), "--data", str(toy),
                                 "--hard-negatives", "none", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
                                 "--max-seq-length", "64", "--dev-corpus-size", "10", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("trained "))
    steps = int(line.split()[1])
    assert f"({steps} values logged)" in line and steps >= 4, line
    assert "train: steps" in result.output  # our bar drove the trainer
    assert "{'loss'" not in result.output and "it/s]" not in result.output, result.output
