"""The selection's plan: which expensive steps it will take, their rates probed on this machine, and each step's
share of the time budget (the rules are :mod:`stagewise.selection.budget`'s).

Made once the zero-shot first stages are measured (their corpus encodings give the bi-encoders' rates), before any
fine-tuning, so that the second stage's share is set aside before the first stage can spend it. The steps: each
bi-encoder to fine-tune; each cross-encoder base (the first is a core answer, more are extra); the shared starts
(the bi-encoder's own base and its fine-tuned weights), planned together so that both run the same recipe and
their comparison holds; and stage 3. Rates and the plan are stored in the run, so a resumed run does not probe again.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from stagewise.models import batch_precision
from stagewise.models.specs import display_name
from stagewise.progress import console
from stagewise.selection import probes
from stagewise.selection.backend_stage import stage3_reserve
from stagewise.selection.budget import Allotment, Level, Rates, Sizes, Step, bi_levels, cross_levels, share_out
from stagewise.timing import step
from stagewise.training.config import MIN_EXAMPLES, BiTrainConfig, CrossTrainConfig
from stagewise.training.cross import fit_max_length, pretraining_queries

SHARED = "shared starts"  # the step of the same-as-bi and from-finetuned-bi starts, which share one recipe
STAGE3 = "stage 3"


class SelectionPlan:
    """The steps still to run and their rates; ``allot(name)`` shares what is left of the budget among them."""

    def __init__(self, s):
        self.s, self.config = s, s.config
        self.steps: dict[str, Step] = {}
        self.rates: dict[str, dict] = {}
        self.shared_level: Level | None = None  # fixed when the first shared start runs: the second runs the same
        self.planned: dict = {}
        self.lengths: dict[str, dict] = {}  # each start's max_length, fitted to the data, and why

    def recipe(self, start: str, **settings) -> CrossTrainConfig:
        """The cross-encoder recipe ``select`` trains a start with: the configured one (training depth at most 20,
        where negatives are mined), its max_length fitted to the data unless configured (``fit_max_length``), no
        pre-training where the corpus gives too few pseudo-queries."""
        config = self.config
        if "max_length" not in config.cross_training:
            if start not in self.lengths:  # by the start's tokenizer (a fine-tuned bi-encoder's is its base's)
                self.lengths[start] = fit_max_length(start, self.s.dataset, config.train_split, seed=config.seed)
            settings = {"max_length": self.lengths[start]["max_length"], **settings}
        recipe = CrossTrainConfig(**{"depth": min(20, max(config.depths)), **config.cross_training, **settings})
        if recipe.pretrain_queries and len(pretraining_queries(recipe, self.s.dataset)) < MIN_EXAMPLES:
            recipe.pretrain_queries = 0  # a corpus of short or untitled texts: fine-tune on the labels alone
        return recipe

    # ---- what it is made of -------------------------------------------------------------------

    def sizes(self, zero_shot: list[dict]) -> Sizes:
        dataset, config = self.s.dataset, self.config
        _, qrels = dataset.split(config.train_split)
        pairs = sum(1 for docs in qrels.values() for rel in docs.values() if rel > 0)
        per_query = [c["latency"]["first_stage"]["mean_ms"] / 1000 for c in zero_shot]
        return Sizes(len(dataset.corpus), len(qrels), pairs, len(self.s.dev_queries), config.latency_queries,
                     list(config.depths), max(per_query, default=0.001))

    def _probe(self, key: str, fn) -> Rates:
        """A rate measured once per run (stored with the steps: a resumed run reads it back)."""
        stored = self.s.steps.get(f"_rates-{key}")
        if stored is None:
            rates = fn()
            stored = self.s.steps.put(f"_rates-{key}", asdict(rates))
        self.rates[key] = stored
        return Rates(**stored)

    def _texts(self):
        dataset = self.s.dataset
        queries = list(dataset.split(self.config.train_split)[0].values())
        return queries, [d.full_text() for d in dataset.corpus.values()]

    def make(self, zero_shot: list[dict], promising: list[dict], candidates: list[dict]) -> None:
        """Probe the rates and list the steps, before any fine-tuning; ``candidates``: the cross-encoder starts as
        they will be if the best zero-shot bi-encoder's line is chosen. No time budget: nothing to plan."""
        if self.s.budget.seconds is None:
            return
        with step("plan"):
            self._make(zero_shot, promising, candidates)
        self.planned = self._describe(share_out(list(self.steps.values()), self.s.budget.remaining()))
        self._print()

    def _make(self, zero_shot: list[dict], promising: list[dict], candidates: list[dict]) -> None:
        self._sizes = self.sizes(zero_shot)
        queries, documents = self._texts()
        for i, z in enumerate(promising):
            training = BiTrainConfig(**{**self.config.bi_training, "model": z["spec"]})

            def measure(z=z, training=training) -> Rates:
                rates = probes.bi_training_rates(z["spec"], training.max_seq_length, queries, documents,
                                                 training.num_negatives, self.config.seed, self.config.train_precision,
                                                 training.batch_size)
                rates.encode = z.get("docs_per_second") or 50.0
                rates.measured["encode"] = "zero-shot corpus encoding"
                return rates

            rates = self._probe(f"bi-{z['name']}", measure)
            self.steps[f"{z['name']} fine-tuned"] = Step(f"{z['name']} fine-tuned",
                                                         _precision(bi_levels(training, rates, self._sizes), rates),
                                                         tier=0, priority=10 - i)
        self.restage(candidates)
        first, reranker = self._stage3_reserve(promising, candidates)
        if first or reranker:  # the reranker's part only from what training leaves: it runs only if one is chosen
            levels = [Level(first + reranker)] + ([Level(first, cuts=["the reranker's backends measured with the "
                                                                     "time left"])] if reranker else [])
            self.steps[STAGE3] = Step(STAGE3, levels, tier=0, priority=5)

    def restage(self, candidates: list[dict]) -> None:
        """The second stage's steps for these cross-encoder starts (again once the first stage is chosen: the starts
        that apply depend on it). Each base start is a step; the shared starts are one step, one recipe for both."""
        if self.s.budget.seconds is None:
            return
        for name in [n for n, st in self.steps.items() if st.stage == 2]:
            del self.steps[name]
        queries, documents = self._texts()
        runnable = [c for c in candidates if "skip" not in c]
        bases = [c for c in runnable if c["init"] == "base"]
        shared = [c for c in runnable if c["init"] != "base"]
        depths = list(self.config.depths)
        for i, c in enumerate(bases):
            recipe = self.recipe(c["model"])
            rates = self._cross_rates(c["model"], recipe.max_length, queries, documents)
            self.steps[c["name"]] = Step(c["name"], _precision(cross_levels(recipe, depths, rates, self._sizes), rates),
                                         tier=0 if i == 0 else 1, priority=8 if i == 0 else 3, stage=2)
        if shared:
            recipe = self.recipe(shared[0]["bi_base"])
            rates = self._cross_rates(shared[0]["bi_base"], recipe.max_length, queries, documents)
            levels = _precision(cross_levels(recipe, depths, rates, self._sizes, trial=True), rates)
            self.steps[SHARED] = Step(SHARED, [replace(lv, seconds=lv.seconds * len(shared)) for lv in levels],
                                      tier=1, priority=2, stage=2)

    def _stage3_reserve(self, promising: list[dict], candidates: list[dict]) -> tuple[float, float]:
        """Stage 3's time at the slowest promising bi-encoder's rates (its corpus rate as stage 1 measured it, and
        that less what bf16 batch work gained: float32's) and the protected cross-encoder start's float32 per-query
        scoring rate: the first base start, the one the plan trains in full. Reserving for the slowest start
        instead cut the protected one's recipe to leave time no run used (SciFact: 62 min reserved, 8 min taken, a
        run done in 46% of its budget); a slower start that wins measures its backends with the time left (stage
        3's lower level)."""
        policy = batch_precision.current()
        corpus = {z["name"]: self.rates[f"bi-{z['name']}"]["encode"] for z in promising}
        slowest = min(corpus, key=corpus.get, default=None)
        docs = slowest and corpus[slowest] / (policy.speedup(slowest) if policy else 1.0)
        return stage3_reserve(self.config, self._sizes, docs, slowest and corpus[slowest],
                              self._protected_score_rate(candidates))

    def _protected_score_rate(self, candidates: list[dict]) -> float | None:
        """The first base start's float32 per-query scoring rate (pairs/s); without one, the slowest start's."""
        bases = [c for c in candidates if "skip" not in c and c["init"] == "base"]
        if bases:
            model = bases[0]["model"]
            rate = self.rates.get(f"cross-{display_name(model)}-{self.recipe(model).max_length}", {}).get("score_query")
            if rate:
                return rate
        pairs = [r["score_query"] for key, r in self.rates.items() if key.startswith("cross-") and r.get("score_query")]
        return min(pairs, default=None)

    def _cross_rates(self, model: str, max_length: int, queries, documents) -> Rates:
        return self._probe(f"cross-{display_name(model)}-{max_length}", lambda: probes.cross_rates(
            model, max_length, queries, documents, self.config.seed, self.config.train_precision,
            self.recipe(model).batch_size))

    # ---- during the run -------------------------------------------------------------------------

    def allot(self, name: str, shared_count: int = 1) -> Allotment | None:
        """This step's share of what is left now, among the steps still to run (None: not planned, no budget).
        A shared start gets its part of the shared step's share, on the recipe fixed for both."""
        key = SHARED if name == SHARED else name
        if key not in self.steps:
            return None
        allotment = share_out(list(self.steps.values()), self.s.budget.remaining())[key]
        if key == SHARED:
            if self.shared_level is None:  # fixed by the first shared start, kept for the others (resumed too)
                stored = self.s.steps.get("_shared-recipe")
                if stored:
                    self.shared_level = Level(**stored)
                elif allotment.level is not None:  # the step's level costs every start; its parts are one start's
                    self.shared_level = replace(allotment.level, seconds=allotment.level.seconds / shared_count)
                    self.s.steps.put("_shared-recipe", asdict(self.shared_level))
            share = None if allotment.share is None else allotment.share / shared_count  # those still to run
            return Allotment(allotment.step, share, self.shared_level, allotment.reason)
        return allotment

    def done(self, name: str) -> None:
        self.steps.pop(name, None)

    def needed(self, allotment: Allotment) -> str:
        """Why a step cannot run, and the ``--time-budget`` that would allow its shortest recipe."""
        others = sum(s.minimum for s in self.steps.values() if s is not allotment.step)
        minutes = self.s.budget.needed_minutes(others + allotment.step.minimum)
        left = allotment.share or 0.0
        return (f"not evaluated: needs about {allotment.step.minimum / 60:.1f} min even shortened, and "
                f"{left / 60:.1f} min of the time budget were left for it; give --time-budget {minutes} to allow it")

    # ---- the record ------------------------------------------------------------------------------

    def _describe(self, allotments: dict[str, Allotment]) -> dict:
        steps = []
        for name, a in allotments.items():
            steps.append({"step": name, "full_s": round(a.step.full, 1), "shortest_s": round(a.step.minimum, 1),
                          "share_s": None if a.share is None else round(a.share, 1),
                          "recipe_s": None if a.level is None else round(a.level.seconds, 1),
                          "cuts": [] if a.level is None else a.level.cuts, "runs": a.runs, "reason": a.reason})
        full = sum(a.step.full for a in allotments.values())
        return {"remaining_s": round(self.s.budget.remaining(), 1), "steps": steps,
                "full_recipes_budget_min": self.s.budget.needed_minutes(full), "rates": self.rates,
                "max_lengths": self.lengths}

    def _print(self) -> None:
        console.print(f"  plan for the {self.s.budget.remaining() / 60:.1f} min left:", highlight=False)
        for row in self.planned["steps"]:
            what = ("left out: " + row["reason"]) if not row["runs"] else (
                f"{row['share_s'] / 60:.1f} min" + (f" ({'; '.join(row['cuts'])})" if row["cuts"] else
                                                    " (its full recipe)"))
            console.print(f"    {row['step']}: {what}", highlight=False)
        if any(row["cuts"] or not row["runs"] for row in self.planned["steps"]):
            console.print(f"    every step's full recipe would need --time-budget "
                          f"{self.planned['full_recipes_budget_min']}", highlight=False)


def _precision(levels: list[Level], rates: Rates) -> list[Level]:
    """Every recipe trains in bf16 mixed precision where the probe measured it clearly faster (its costs are at
    that rate already)."""
    for level in levels:
        level.settings["bf16"] = rates.train_bf16
    return levels
