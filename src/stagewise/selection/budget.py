"""The selection's time budget: one plan across both stages, made up front from rates measured on this machine.

Every expensive step (a bi-encoder fine-tuning, a cross-encoder start, the shared-initialisation trial, stage 3)
has a ladder of recipes, from the one asked for down to the shortest that still answers its question, each with
a cost computed from measured rates (documents encoded, examples trained and pairs scored per second). The plan:

1. every step gets the cost of its shortest recipe: the second stage's share is reserved before the first stage
   spends anything, and optimising the bi-encoder first does not let it take everything;
2. what is left is shared in proportion to what each step could still use, up to its full recipe;
3. a step then runs the longest recipe that fits its share, and records what was cut; training stops at the share
   whatever the estimate said, so a wrong estimate cannot eat another step's time;
4. where even the shortest recipes do not all fit, the least important steps are left out, each with the estimate
   that ruled it out and the ``--time-budget`` that would allow it.

The plan is made again before each step over the time really left, so time a step did not use goes to the next.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable


class TimeBudget:
    """Wall-clock time shared out between the remaining expensive steps in proportion to their estimated cost."""

    def __init__(self, minutes: float | None, clock: Callable[[], float] = time.perf_counter, spent: float = 0.0):
        self.seconds = None if minutes is None else minutes * 60.0
        self.clock = clock
        self.start = clock() - spent  # a resumed run has already spent some of its budget

    def spent(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return math.inf if self.seconds is None else max(0.0, self.seconds - self.spent())

    def plan(self, estimate: float, later: float = 0.0, minimum: float = 0.25) -> tuple[str, float | None]:
        """The step's share of what remains, in proportion to its estimated cost against ``later`` (the steps
        still to come): ``("run", share)`` when the estimate fits it, ``("shorten", share)`` when at least
        ``minimum`` of it does, else ``("skip", share)``. A step is held to its share even when its estimate
        fitted, so a wrong estimate cannot eat the others' time. No budget: ``("run", None)``."""
        if self.seconds is None:
            return "run", None
        share = self.remaining() * estimate / max(estimate + later, 1e-9)
        if estimate <= share:
            return "run", share
        if share >= minimum * estimate:
            return "shorten", share
        return "skip", share

    def needed_minutes(self, seconds: float) -> int:
        """The ``--time-budget`` (whole minutes) that leaves ``seconds`` more than what has been spent so far."""
        return max(1, math.ceil((self.spent() + seconds) / 60.0))


@dataclass
class Level:
    """One recipe on a step's ladder: its estimated cost, the settings it changes, and the cuts in words."""

    seconds: float
    settings: dict = field(default_factory=dict)
    cuts: list[str] = field(default_factory=list)
    parts: dict = field(default_factory=dict)  # the cost's phases (seconds), each held to its part of a share


@dataclass
class Step:
    """An expensive step of the selection. ``levels``: its recipes, the one asked for first, cheaper after.
    ``tier``: 0 for the core answers (the first stage fine-tuned, one reranker), 1 for the extra ones (more starts,
    the shared-initialisation trial); the core get their full recipes before the extra get more than their shortest.
    ``priority``: where even the shortest recipes do not all fit, the lowest is left out first."""

    name: str
    levels: list[Level]
    tier: int = 0
    priority: int = 0
    stage: int = 1

    @property
    def full(self) -> float:
        return self.levels[0].seconds

    @property
    def minimum(self) -> float:
        return self.levels[-1].seconds


@dataclass
class Allotment:
    """A step's part of the plan: its share of the time, the recipe that fits it, or why it cannot run."""

    step: Step
    share: float | None  # None: no time budget
    level: Level | None  # None: left out
    reason: str = ""

    @property
    def runs(self) -> bool:
        return self.level is not None


def share_out(steps: list[Step], seconds: float) -> dict[str, Allotment]:
    """Each step's share of ``seconds`` and the longest recipe that fits it (see the module's docstring)."""
    if math.isinf(seconds):
        return {s.name: Allotment(s, None, s.levels[0]) for s in steps}
    active = list(steps)
    out: dict[str, Allotment] = {}
    while active and sum(s.minimum for s in active) > seconds:
        dropped = min(active, key=lambda s: (s.priority, -s.tier))
        active.remove(dropped)
        left = max(0.0, seconds - sum(s.minimum for s in active))
        out[dropped.name] = Allotment(dropped, left, None, f"its shortest recipe needs about "
                                      f"{dropped.minimum / 60:.1f} min; {left / 60:.1f} min are left for it")
    shares = {s.name: s.minimum for s in active}
    surplus = seconds - sum(shares.values())
    for tier in sorted({s.tier for s in active}):  # up to the full recipes, the core first
        members = [s for s in active if s.tier == tier]
        room = sum(s.full - s.minimum for s in members)
        if room <= 0 or surplus <= 0:
            continue
        given = min(surplus, room)
        for s in members:
            shares[s.name] += given * (s.full - s.minimum) / room
        surplus -= given
    total = sum(s.full for s in active)
    for s in active:  # time beyond every full recipe: a slack against estimates that were low
        share = shares[s.name] + (surplus * s.full / total if surplus > 0 and total > 0 else 0.0)
        level = next((lv for lv in s.levels if lv.seconds <= share * 1.0001), s.levels[-1])
        out[s.name] = Allotment(s, share, level)
    return out


# --------------------------------------------------------------------------------------------
# Rates and costs
# --------------------------------------------------------------------------------------------


@dataclass
class Rates:
    """Measured on this machine for one model: documents encoded per second (batch path), training examples per
    second, pairs scored per second on the batch path and on the per-query path."""

    encode: float | None = None
    train: float | None = None
    train_bf16: bool = False  # the training rate is bf16 mixed precision's (measured faster than float32)
    score: float | None = None
    score_query: float | None = None
    measured: dict = field(default_factory=dict)  # where each came from, for the report


@dataclass
class Sizes:
    """What the costs scale with: the dataset's and the selection's sizes."""

    corpus: int
    train_queries: int
    train_pairs: int
    dev_queries: int
    latency_queries: int
    depths: list[int]
    query_seconds: float  # the slowest first stage's time per query (mining and latency runs retrieve per query)


QUERY_TEXT_SPEEDUP = 5.0  # a query is about a fifth of a document's length: encoding one costs about that less


def bi_cost(config, rates: Rates, sizes: Sizes, fraction: float = 1.0) -> tuple[float, float]:
    """Seconds to fine-tune a bi-encoder on ``fraction`` of its recipe's steps, and around the training: mining
    (the corpus embeddings are cached by the zero-shot evaluation; the training queries are encoded), dev
    evaluations on the dev corpus sample, re-encoding the corpus and evaluating the fine-tuned model."""
    examples = sizes.train_pairs * config.epochs * fraction
    train = examples / rates.train
    mining = sizes.train_queries / (rates.encode * QUERY_TEXT_SPEEDUP) if config.hard_negatives == "model" else 1.0
    evaluations = (math.ceil(config.epochs * fraction) + (fraction < 1)) * min(config.dev_corpus_size, sizes.corpus)
    around = mining + (evaluations + sizes.corpus) / rates.encode + sizes.dev_queries * sizes.query_seconds
    return train, around


def cross_cost(config, depths: list[int], rates: Rates, sizes: Sizes) -> tuple[float, float, float]:
    """Seconds to pre-train, to fine-tune (mining and dev evaluations included) and to evaluate a cross-encoder at
    every depth (one scoring pass at the deepest, then the latency runs)."""
    group = 1 + config.hard_negatives + config.random_negatives
    queries = min(sizes.train_queries, config.max_train_queries or sizes.train_queries)
    positives = sizes.train_pairs / max(1, sizes.train_queries)
    pretrain = 0.0
    if config.pretrain_queries:
        pseudo = min(config.pretrain_queries, sizes.corpus)
        pretrain = pseudo * group * config.pretrain_epochs / rates.train + pseudo * sizes.query_seconds
    dev = min(sizes.dev_queries, config.dev_sample or sizes.dev_queries)
    evaluations = math.ceil(config.epochs) + 1  # one per epoch, and the collapse check on the best checkpoint
    train = (queries * (positives + config.hard_negatives + config.random_negatives) * config.epochs / rates.train
             + (queries + sizes.dev_queries) * sizes.query_seconds + evaluations * dev * config.depth / rates.score)
    evaluate = (sizes.dev_queries * max(depths) / rates.score
                + sizes.latency_queries * (sum(depths) / rates.score_query + len(depths) * sizes.query_seconds))
    return pretrain, train, evaluate


# --------------------------------------------------------------------------------------------
# Ladders: each step's recipes, from the one asked for down to its shortest
# --------------------------------------------------------------------------------------------

BI_FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # of the recipe's training steps; a quarter epoch still shows the direction
DEV_SAMPLE = 100  # dev queries a shortened trial evaluates on during training (every dev query at the end)


def bi_levels(config, rates: Rates, sizes: Sizes) -> list[Level]:
    """A bi-encoder fine-tuning at decreasing fractions of its training steps (training stops at its share)."""
    levels = []
    for fraction in BI_FRACTIONS:
        train, around = bi_cost(config, rates, sizes, fraction)
        cuts = [] if fraction == 1 else [f"about {fraction:.0%} of its training steps"]
        levels.append(Level(train + around, {}, cuts, {"train_s": train, "around_s": around}))
    return levels


def _cross_cuts(config, sizes: Sizes, trial: bool) -> list[dict]:
    """The cuts in the order they are made, each a change of settings (``depths``: the largest depth kept)."""
    cuts: list[dict] = []
    for pretrain, epochs, depth in ((1000, None, None), (None, 2, None), (None, None, 50), (500, None, None),
                                    (None, 1, None), (None, None, 20), (250, None, None)):
        cuts.append({k: v for k, v in (("pretrain_queries", pretrain), ("epochs", epochs), ("depths", depth))
                     if v is not None})
    if trial:  # the shared starts: the same shortened recipe for each, so the comparison still holds
        half, quarter = math.ceil(sizes.train_queries / 2), math.ceil(sizes.train_queries / 4)
        cuts += [{"dev_sample": DEV_SAMPLE}, {"pretrain_queries": 0}, {"max_train_queries": half},
                 {"hard_negatives": 3, "random_negatives": 1}, {"max_train_queries": quarter}]
    return cuts


def describe_cuts(settings: dict, config, depths: list[int], sizes: Sizes) -> list[str]:
    """What a recipe cut, in words, against the one asked for."""
    out = []
    if "pretrain_queries" in settings:
        out.append("no pre-training" if settings["pretrain_queries"] == 0 else
                   f"pre-training on {settings['pretrain_queries']} pseudo-queries (of {config.pretrain_queries})")
    if "epochs" in settings:
        out.append(f"{settings['epochs']:g} epoch{'s' if settings['epochs'] != 1 else ''} (of {config.epochs:g})")
    if "max_train_queries" in settings:
        out.append(f"{settings['max_train_queries']} of {sizes.train_queries} training queries")
    if "hard_negatives" in settings or "random_negatives" in settings:
        hard, rand = (settings.get(k, getattr(config, k)) for k in ("hard_negatives", "random_negatives"))
        out.append(f"{hard} hard and {rand} random negatives per query "
                   f"(of {config.hard_negatives} and {config.random_negatives})")
    if "dev_sample" in settings:
        out.append(f"dev evaluations during training on {settings['dev_sample']} of {sizes.dev_queries} queries")
    if "depths" in settings:
        dropped = [d for d in depths if d not in settings["depths"]]
        out.append(f"depth{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))} not evaluated")
    return out


def cross_levels(config, depths: list[int], rates: Rates, sizes: Sizes, trial: bool = False) -> list[Level]:
    """A cross-encoder start's recipes: the one asked for, then each cut in turn (``trial``: on down to the shared
    starts' shortest)."""
    from dataclasses import replace

    def level(settings: dict) -> Level:
        recipe = replace(config, **{k: v for k, v in settings.items() if k != "depths"})
        pretrain, train, evaluate = cross_cost(recipe, settings.get("depths", depths), rates, sizes)
        return Level(pretrain + train + evaluate, dict(settings), describe_cuts(settings, config, depths, sizes),
                     {"pretrain_s": pretrain, "train_s": train, "evaluate_s": evaluate})

    settings: dict = {}
    levels = [level(settings)]
    for cut in _cross_cuts(config, sizes, trial):
        change = {}
        for key, value in cut.items():
            if key == "depths":
                kept = [d for d in settings.get("depths", depths) if d <= value] or [min(depths)]
                if len(kept) < len(settings.get("depths", depths)):
                    change["depths"] = kept
                continue
            current = settings.get(key, getattr(config, key))
            limit = sizes.dev_queries if key == "dev_sample" else sizes.train_queries if key == "max_train_queries" \
                else math.inf
            if value < min(limit, math.inf if current is None else current):
                change[key] = value
        if change:
            settings = {**settings, **change}
            levels.append(level(settings))
    return levels
