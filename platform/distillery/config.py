"""The run config: one typed object, validated on load, defaults in one place.

`load_config("configs/demo.yaml", ["data.synthetic.users=500"])` reads YAML, applies `key.sub=value`
overrides (values parsed as YAML scalars/lists), and validates. Unknown keys and wrong types raise
`ConfigError` naming the dotted key and what was expected.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- data
class SyntheticConfig(_Section):
    """Parameters of the embedded generator (`distillery generate-data`)."""

    users: int = Field(1500, ge=10, description="number of users")
    items: int = Field(600, ge=40, description="catalogue size")
    seed: int = Field(0, description="generator seed; same seed, same data")
    sessions_per_user: float = Field(12.0, gt=1, description="mean sessions (impressions) per user")
    slots: int = Field(8, ge=2, le=50, description="items shown per impression")
    query_rate: float = Field(0.4, ge=0, le=1, description="fraction of sessions that start with a search")
    review_rate: float = Field(0.3, ge=0, le=1, description="fraction of clicks that get a review")


class DataConfig(_Section):
    format: Literal["synthetic", "native", "lcrec", "amazon", "mind"] = Field(
        "synthetic",
        description="input schema: synthetic (generated), native contract, LC-Rec json, "
        "Amazon reviews JSON lines (2014/2018/2023), or MIND tsv",
    )
    reader: Literal["auto", "parquet", "json", "csv", "hf"] = Field(
        "auto",
        description="how native/amazon sources are read: by file extension (auto), or a Hugging Face "
        "dataset (hub id or save_to_disk folder, optional ?name=CONFIG&split=SPLIT)",
    )
    items: Optional[str] = Field(None, description="item catalogue path or URI")
    interactions: Optional[str] = Field(None, description="interaction / click log path or URI")
    reviews: Optional[str] = Field(None, description="reviews path or URI (optional)")
    synthetic: SyntheticConfig = SyntheticConfig()
    max_reject_fraction: float = Field(0.05, ge=0, le=1, description="fail when more rows of a table are rejected")
    rating_range: tuple[float, float] = Field((1.0, 5.0), description="valid [min, max] review rating")
    user_buckets: int = Field(16, ge=1, le=4096, description="hash buckets of users for per-user Ray Data work")
    show_rejects: int = Field(5, ge=0, description="rejected rows printed per run")
    shuffle: Literal["sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle", "shuffle_v2"] = Field(
        "sort_shuffle_pull_based", description="Ray Data shuffle used by the per-user groupbys")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.format != "synthetic":
            for key in ("interactions", "items"):
                if not getattr(self, key):
                    raise ValueError(
                        f"data.{key} is required for data.format={self.format}: pass data.{key}=PATH"
                    )
        if self.reader == "hf" and self.format not in ("native", "amazon"):
            raise ValueError("data.reader=hf works with data.format=native or amazon")
        lo, hi = self.rating_range
        if lo >= hi:
            raise ValueError(f"data.rating_range must be [min, max] with min < max, got {list(self.rating_range)}")
        return self


# ---------------------------------------------------------------------------------------- tasks
# Each task's T_t and a_t defaults are the best trial of a Tune sweep of T and a per task on Amazon
# Office's validation split (benchmarks/tune_compress.py, 16 trials; docs/stages.md "The tune stage").
SWEPT = "; default: the Office sweep's best trial"


class _TaskBase(_Section):
    enabled: bool = True
    weight: float = Field(1.0, ge=0, description="loss weight w_t")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T_t")
    alpha: float = Field(0.5, ge=0, le=1, description="soft/hard mix a_t (0 = hard labels only)")

    # Fields that shape the loss, not the examples: changing them must not re-run `prepare`.
    LOSS_FIELDS: ClassVar[tuple[str, ...]] = ("weight", "temperature", "alpha")


class RecommendationTask(_TaskBase):
    temperature: float = Field(1.3, gt=0, description="distillation temperature T_t" + SWEPT)
    alpha: float = Field(0.94, ge=0, le=1, description="soft/hard mix a_t (0 = hard labels only): nearly all "
                         "soft, the teacher's list says more than the one next item" + SWEPT)
    max_history: int = Field(50, ge=1, description="most recent items kept per history")
    rank_weight: float = Field(0.0, ge=0, description="weight b of the ranking-distillation term (the teacher's "
                                                      "top rank_k items as rank-weighted pseudo-positives; 0 = off)")
    rank_k: int = Field(10, ge=1, description="teacher items used as pseudo-positives (at most label.top_k)")
    rank_lambda: float = Field(5.0, gt=0, description="rank weights decay as exp(-rank / rank_lambda)")

    LOSS_FIELDS: ClassVar[tuple[str, ...]] = _TaskBase.LOSS_FIELDS + ("rank_weight", "rank_k", "rank_lambda")


class CtrTask(_TaskBase):
    temperature: float = Field(4.4, gt=0, description="distillation temperature T_t" + SWEPT)
    alpha: float = Field(0.52, ge=0, le=1, description="soft/hard mix a_t (0 = hard labels only)" + SWEPT)
    max_history: int = Field(20, ge=1, description="most recent clicked items kept per history")
    negative_ratio: int = Field(
        4, ge=1, description="sampled negatives per positive when the log has no real impressions"
    )
    popularity_alpha: float = Field(
        0.75, ge=0, le=2, description="negatives are sampled with probability ~ count**alpha"
    )


class _TextTaskBase(_TaskBase):
    """A text classification task's section: its texts are split by a hash of the text."""
    split_fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/valid/test")

    @model_validator(mode="after")
    def _check_splits(self):
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {self.split_fractions}")
        return self


class IntentTask(_TextTaskBase):
    temperature: float = Field(1.4, gt=0, description="distillation temperature T_t" + SWEPT)
    alpha: float = Field(0.41, ge=0, le=1, description="soft/hard mix a_t (0 = hard labels only)" + SWEPT)
    category_level: int = Field(2, ge=1, description="category path depth used as the intent label")
    min_class_count: int = Field(10, ge=1, description="classes with fewer texts merge into 'other'")
    sources: list[Literal["queries", "item_titles", "review_titles"]] = Field(
        default_factory=lambda: ["queries", "item_titles", "review_titles"],
        description="where intent texts come from (each used when the data has it)",
    )
    transfer_variants: int = Field(4, ge=0, le=64, description="transfer texts made per train text (random word "
                                   "subsets and spans of it, none equal to any intent text of any split), labelled "
                                   "by the teacher only: the KD student learns from them, the no-KD one cannot")
    kd_class_power: float = Field(0.0, ge=0, le=2, description="the soft term weighs each row by (rows whose teacher "
                                  "class is the row's)^-power, scaled to mean 1: 0 = every row alike, 0.5 = the rare "
                                  "classes that decide macro-F1 count for more, 1 = every class weighs the same")

    LOSS_FIELDS: ClassVar[tuple[str, ...]] = _TaskBase.LOSS_FIELDS + ("kd_class_power",)

    @model_validator(mode="after")
    def _check(self) -> "IntentTask":
        if not self.sources:
            raise ValueError("sources must name at least one of queries, item_titles, review_titles")
        return self


class SentimentTask(_TextTaskBase):
    enabled: bool = Field(False, description="review sentiment from each review's title and text (needs reviews with "
                                             "ratings: data.reviews, or the generated shop's)")
    negative_max: float = Field(2.0, description="ratings at most this are negative (1-2 of 5 stars)")
    positive_min: float = Field(4.0, description="ratings at least this are positive (4-5 of 5); neutral between")

    @model_validator(mode="after")
    def _check(self) -> "SentimentTask":
        if self.negative_max >= self.positive_min:
            raise ValueError(f"negative_max ({self.negative_max}) must be below positive_min ({self.positive_min})")
        return self


class TasksConfig(_Section):
    """One section per task, in the order of the task registry (`distillery.tasks.TASKS`)."""

    recommendation: RecommendationTask = RecommendationTask()
    ctr: CtrTask = CtrTask()
    intent: IntentTask = IntentTask()
    sentiment: SentimentTask = SentimentTask()

    def enabled(self) -> list[str]:
        return [name for name in TASK_NAMES if getattr(self, name).enabled]


TASK_NAMES = tuple(TasksConfig.model_fields)
TUNED_PER_TASK = ("temperature", "alpha", "weight")  # the per-task knobs a sweep samples (TuneSpace)


# ------------------------------------------------------------------------ later pipeline stages
class SequenceConfig(_Section):
    """The teacher's sequence recommender (recommendation and CTR), SASRec family (`seqrec.py`), and
    how it and the SASRec baseline train: every position of each user's train sequence, cross
    entropy over the catalogue, until validation NDCG@10 stops improving.

    The teacher is an ensemble of `members` seeds per width in `dims`: each width trains once per
    dropout in `dropouts`, keeps the dropout with the best validation score, and trains `members` - 1
    more seeds of it."""

    dims: list[int] = Field(default_factory=lambda: [64, 128],
                            description="widths of item and user vectors: one ensemble member per width")
    dropouts: list[float] = Field(default_factory=lambda: [0.3, 0.5],
                                  description="dropouts on embeddings, attention and feed-forward tried per width; "
                                              "the best on validation is kept (one value: no search)")
    layers: int = Field(2, ge=1, le=12, description="causal transformer layers")
    heads: int = Field(2, ge=1, description="attention heads (must divide every width)")
    item_text: bool = Field(True, description="items = ID embedding + adaptor over the frozen encoder's embedding "
                                              "of the item text (false: ID only, as the SASRec baseline)")
    item_ids: bool = Field(True, description="learn an ID embedding per item (false: items are their text alone)")
    adaptor_hidden: int = Field(256, ge=0, description="hidden width of the MLP that maps an item's text embedding "
                                                       "into the model (0 = a linear map)")
    members: int = Field(2, ge=1, le=16, description="members per width, trained from different seeds at the "
                                                     "width's chosen dropout; every member's scores are averaged "
                                                     "when labeling (on Office a second seed per width added 1.4% "
                                                     "test NDCG@10 in the pipeline, one seed)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (constant)")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1, description="user sequences per step (length-bucketed)")
    weighting: Literal["target", "batch"] = Field(
        "target", description="next-item loss of a step: 'target' = every target of the epoch weighs the same (the "
                              "sum over the step's targets over the epoch's mean per step), as with randomly drawn "
                              "batches; 'batch' = the mean over the step's targets, so that with length-bucketed "
                              "batches a short history's target weighs up to ~10x a long one's (Office: SASRec test "
                              "NDCG@10 0.0564 against 0.0669 with 'target')")
    ctr_batch_size: int = Field(512, ge=1, description="CTR examples per step, beside the sequences")
    ctr_trains_encoder: bool = Field(False, description="let the CTR loss train the sequence model too (false: it "
                                                        "trains the CTR head on the sequence model's user states)")
    epochs: int = Field(400, ge=1, description="most epochs (one pass over the users each)")
    eval_every: int = Field(5, ge=1, description="epochs between validations (and checkpoints)")
    patience: int = Field(5, ge=1, description="validations without a better NDCG@10 before stopping")
    sampled_softmax_above: int = Field(200_000, ge=100, description="catalogues larger than this train with a sampled "
                                                                    "softmax (logQ-corrected) instead of the full one")
    negatives: int = Field(8192, ge=16, description="items sampled per step (by popularity) for that sampled softmax")

    @model_validator(mode="after")
    def _check(self):
        if not self.dims or not self.dropouts:
            raise ValueError("dims and dropouts need at least one value each")
        if bad := [d for d in self.dims if d < 8 or d % self.heads]:
            raise ValueError(f"dims {bad}: each width must be >= 8 and a multiple of heads={self.heads}")
        if any(not 0 <= p < 1 for p in self.dropouts):
            raise ValueError(f"dropouts must lie in [0, 1), got {self.dropouts}")
        if len(set(self.dims)) < len(self.dims) or len(set(self.dropouts)) < len(self.dropouts):
            raise ValueError(f"dims {self.dims} and dropouts {self.dropouts} must not repeat a value "
                             "(more members of one width: raise members)")
        if not (self.item_text or self.item_ids):
            raise ValueError("items need an ID embedding, their text or both: item_ids and item_text cannot both be false")
        return self


class SasrecBaselineConfig(_Section):
    """The converged ID-only SASRec every run reports beside the teacher: one model per (dim, dropout)
    pair, trained with teacher.sequence's layers, heads, learning rate, batch and patience; the one
    with the best validation NDCG@10 is the baseline."""

    enabled: bool = Field(True, description="train and report it (needs the recommendation task)")
    dims: list[int] = Field(default_factory=lambda: [64, 128], description="widths tried")
    dropouts: list[float] = Field(default_factory=lambda: [0.2, 0.5], description="dropouts tried")

    @model_validator(mode="after")
    def _check(self):
        if not self.dims or not self.dropouts:
            raise ValueError("dims and dropouts need at least one value each")
        if any(not 0 <= p < 1 for p in self.dropouts) or any(d < 8 for d in self.dims):
            raise ValueError(f"dropouts must lie in [0, 1) and dims be >= 8 (got {self.dropouts}, {self.dims})")
        return self


class TeacherConfig(_Section):
    model: str = Field("all-MiniLM-L6-v2", description="HF encoder folder, or the bundled all-MiniLM-L6-v2")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    use_gpu: bool = Field(False, description="one GPU per worker, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; torch threads follow it")
    epochs: int = Field(10, ge=1, description="most epochs of each text classifier's fine-tuning")
    patience: int = Field(2, ge=1, description="text classifiers: epochs without a better validation score "
                                                  "(the task's score metric) before stopping")
    intent_batch_size: int = Field(32, ge=1, description="texts per step through a text classifier's encoder "
                                                            "(every text task)")
    lr: float = Field(1e-4, gt=0, description="encoder learning rate (AdamW)")
    head_lr: float = Field(1e-3, gt=0, description="learning rate of a text classifier's head")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warmup share of the encoder's steps")
    weight_decay: float = Field(0.01, ge=0)
    max_length: int = Field(64, ge=8, le=4096, description="tokens per text")
    lexical_dim: int = Field(0, ge=0, description="width of the learned bag of hashed words and 3-5 character "
                                                   "n-grams beside the encoder in a text classifier's head (0 = the "
                                                   "encoder alone)")
    lexical_buckets: int = Field(1 << 16, ge=1024, description="hash buckets of that bag (rows of its table)")
    lexical_lr: float = Field(3e-3, gt=0, description="learning rate of that bag")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from the last checkpoint")
    typo_augment: float = Field(0.0, ge=0, le=1, description="share of training texts given one random typo "
                                                              "(swap, drop or repeat a letter) each time they are seen")
    word_drop_augment: float = Field(0.0, ge=0, le=1, description="share of training texts cut to a random subset of "
                                                                   "their words (each kept with p=1/2, at least one)")
    shard: Literal["none", "fsdp"] = Field("none", description="labeling: 'fsdp' shards the encoder across the "
                                                               "label workers' GPUs (teachers too large for one)")
    sequence: SequenceConfig = SequenceConfig()
    sasrec: SasrecBaselineConfig = SasrecBaselineConfig()

    @model_validator(mode="after")
    def _sasrec_widths_fit_the_heads(self):
        # the baseline grid uses teacher.sequence.heads: a width it does not divide fails inside a worker
        bad = [d for d in self.sasrec.dims if d % self.sequence.heads]
        if self.sasrec.enabled and bad:
            raise ValueError(f"teacher.sasrec.dims {bad} must be multiples of teacher.sequence.heads="
                             f"{self.sequence.heads}")
        return self


class LabelConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers; each labels its shard of the examples")
    use_gpu: bool = Field(False, description="one GPU per worker, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (torch threads follow); leave some free "
                                                          "for Ray Data")
    top_k: int = Field(50, ge=1, description="teacher's top-K items (ids and scores) kept per recommendation example")
    batch_size: int = Field(1024, ge=1, description="recommendation / CTR examples per forward pass")
    text_batch_size: int = Field(128, ge=1, description="intent texts per forward pass through the encoder")
    tokenize: Literal["auto", "worker", "data"] = Field(
        "auto", description="where intent texts are tokenized: 'data' = Ray Data tasks beside the workers (keeps a "
                            "GPU fed), 'worker' = in the worker before each forward (no hand-off: faster on CPU), "
                            "'auto' = 'data' with use_gpu, else 'worker'")
    tokenize_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data tokenization task (tokenize=data); give the "
                                                        "workers few CPUs and tokenization the rest of a GPU node")
    rows_per_file: int = Field(20000, ge=1, description="labels per Parquet part; a crash loses at most one "
                                                        "unwritten part per worker and task")
    max_failures: int = Field(2, ge=0, description="worker failures survived; finished parts are never redone")


class StudentConfig(_Section):
    dim: int = Field(64, ge=4, description="shared width of item, text and user vectors")
    text_dim: int = Field(32, ge=4, description="width of the text bag's table (projected to dim)")
    ngram_buckets: int = Field(16384, ge=0, description="hashed word / character n-gram rows in the text bag "
                                                       "beside the teacher tokenizer's word pieces (0 = none)")
    layers: int = Field(1, ge=0, le=4, description="transformer layers over the history (0 = attention pooling only)")
    heads: int = Field(2, ge=1, description="attention heads in those layers (must divide dim)")
    dropout: float = Field(0.1, ge=0, lt=1)
    init_from_teacher: bool = Field(True, description="the KD student starts from the teacher's item vectors and "
                                    "word-piece embeddings (projected to its widths by a truncated SVD); the no-KD student "
                                    "always starts from random weights")

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"student.heads={self.heads} must divide student.dim={self.dim}")
        return self


class DistillConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    use_gpu: bool = Field(False, description="one GPU per worker, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; torch threads follow it")
    epochs: int = Field(8, ge=1)
    patience: int = Field(3, ge=1, description="epochs without a better validation score before stopping")
    batch_size: int = Field(512, ge=1, description="examples per step, all tasks together")
    mix: dict[str, float] = Field(
        default_factory=lambda: {"recommendation": 0.3, "ctr": 0.5, "intent": 0.2, "sentiment": 0.2},
        description="share of each step's batch per task (normalized over the enabled tasks)")
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="default: all train examples / batch_size")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (linear warmup, then linear decay)")
    text_lr_scale: float = Field(10.0, gt=0, description="the text bag table's learning rate as a multiple of lr: "
                                 "most of its rows are rare n-grams that a step touches seldom (10: the best "
                                 "validation score of 1, 5, 10 and 20 on Amazon Office)")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from the last checkpoint")

    @model_validator(mode="after")
    def _mix_names_tasks(self):
        unknown = set(self.mix) - set(TASK_NAMES)
        if unknown or any(v < 0 for v in self.mix.values()) or not any(v > 0 for v in self.mix.values()):
            raise ValueError(f"distill.mix needs non-negative shares for {', '.join(TASK_NAMES)} (got {self.mix})")
        return self


class Range(_Section):
    """A numeric search range; `log` samples it on a log scale (low must then be > 0)."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0 (got {self.low})")
        return self


class TuneSpace(_Section):
    """What the sweep searches. The per-task ranges are sampled for each enabled task separately
    (T_t, a_t, w_t); a field set to null is not searched and keeps the run config's value."""

    temperature: Optional[Range] = Field(Range(low=1.0, high=10.0, log=True), description="per-task T_t")
    alpha: Optional[Range] = Field(Range(low=0.0, high=1.0), description="per-task soft/hard mix a_t")
    weight: Optional[Range] = Field(Range(low=0.5, high=2.0, log=True), description="per-task loss weight w_t")
    lr: Optional[Range] = Field(Range(low=1e-3, high=1e-2, log=True), description="AdamW learning rate")
    rank_weight: Optional[Range] = Field(Range(low=0.0, high=1.0), description="recommendation's ranking-"
                                         "distillation weight b")
    kd_class_power: Optional[Range] = Field(Range(low=0.0, high=1.0), description="intent's class-balance power "
                                            "of the soft term (tasks.intent.kd_class_power)")
    dim: Optional[list[int]] = Field(None, description="student widths to choose from (null: keep student.dim)")

    @model_validator(mode="after")
    def _in_domain(self):
        if self.temperature is not None and self.temperature.low <= 0:
            raise ValueError(f"temperature.low must be > 0 (got {self.temperature.low})")
        if self.alpha is not None and (self.alpha.low < 0 or self.alpha.high > 1):
            raise ValueError(f"alpha must lie in [0, 1] (got [{self.alpha.low}, {self.alpha.high}])")
        if self.weight is not None and self.weight.low < 0:
            raise ValueError(f"weight.low must be >= 0 (got {self.weight.low})")
        if self.lr is not None and self.lr.low <= 0:
            raise ValueError(f"lr.low must be > 0 (got {self.lr.low})")
        if self.rank_weight is not None and self.rank_weight.low < 0:
            raise ValueError(f"rank_weight.low must be >= 0 (got {self.rank_weight.low})")
        if self.kd_class_power is not None and (self.kd_class_power.low < 0 or self.kd_class_power.high > 2):
            raise ValueError(f"kd_class_power must lie in [0, 2] (got [{self.kd_class_power.low}, "
                             f"{self.kd_class_power.high}])")
        if self.dim is not None and (not self.dim or min(self.dim) < 4):
            raise ValueError(f"dim must be a non-empty list of widths >= 4 (got {self.dim})")
        return self


class TuneConfig(_Section):
    num_samples: int = Field(16, ge=1, description="trials in the sweep")
    max_concurrent_trials: int = Field(1, ge=1, description="trials at once; each takes distill.num_workers "
                                                             "workers of distill.cpus_per_worker CPUs")
    search: Literal["optuna", "random"] = Field("optuna", description="optuna: TPE through Ray Tune's OptunaSearch "
                                                "(learns from finished trials); random: Ray Tune's random sampling")
    epochs: Optional[int] = Field(None, ge=1, description="epoch budget per trial (default: distill.epochs)")
    grace_period: int = Field(2, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep the best 1/reduction_factor at each rung")
    space: TuneSpace = TuneSpace()


class CompressConfig(_Section):
    """Variants of the winning student (`compress.py`, `shrink.py`), each smaller or faster than the
    one it is made from; the smallest within every task's budget is bundled."""

    vocab_min_count: int = Field(1, ge=0, description="text-table rows the catalogue and the training texts use fewer "
                                                     "times are dropped (their ids share one row); 0 keeps the whole table")
    vocab_reserve: int = Field(0, ge=0, description="word pieces kept beyond those, lowest ids first (WordPiece and "
                                                    "BPE vocabularies list frequent pieces first)")
    unit_keep: list[float] = Field(default_factory=lambda: [0.5],
                                   description="structured pruning: fractions of the MLPs' hidden units and of the text "
                                               "table's columns kept, one variant each, fine-tuned")
    finetune_steps: int = Field(300, ge=0, description="distillation steps after structured pruning")
    int8: bool = Field(True, description="also try 8-bit weights of every variant (a 4x smaller file; served as float32)")
    max_relative_drop: float = Field(0.01, ge=0, le=1, description="largest validation drop on a task, relative to the "
                                     "uncompressed student, a kept variant may have")
    task_budgets: dict[str, float] = Field(
        default_factory=dict, description="per-task overrides of max_relative_drop, e.g. {intent: 0.02}")
    latency_requests: int = Field(100, ge=10, description="batch-1 requests timed per variant (p50), beside a batch of 256")
    cpus: float = Field(1.0, gt=0, description="CPUs of the Ray task that fine-tunes and evaluates the variants")

    @model_validator(mode="after")
    def _fractions(self):
        bad = [k for k in self.unit_keep if not 0 < k < 1]
        if bad:
            raise ValueError(f"unit_keep fractions must lie strictly between 0 and 1 (got {bad})")
        bad = {t: b for t, b in self.task_budgets.items() if not 0 <= b <= 1}
        if bad:
            raise ValueError(f"task_budgets must lie in [0, 1] (got {bad})")
        if unknown := sorted(set(self.task_budgets) - set(TASK_NAMES)):
            raise ValueError(f"task_budgets names no task {unknown}: the tasks are {', '.join(TASK_NAMES)}")
        return self

    def budget(self, task: str) -> float:
        return self.task_budgets.get(task, self.max_relative_drop)


class ReportConfig(_Section):
    latency_requests: int = Field(200, ge=10, description="batch-1 requests timed per model (median and p99)")
    bootstrap: int = Field(1000, ge=100, description="paired bootstrap resamples of the test split behind each "
                           "student / teacher interval (report.json `relative_to_teacher`)")


class ServeConfig(_Section):
    """The HTTP endpoint: one place for its defaults. `distillery serve` takes them as options and
    `serve/config.yaml` as its application's `args` (not a run config section: a bundle is served
    apart from the run that made it)."""

    host: str = Field("127.0.0.1", description="interface to bind; loopback unless told otherwise")
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(32, ge=1, le=4096, description="requests per @serve.batch call of the model")
    batch_wait_timeout_s: float = Field(0.001, ge=0, le=10, description="longest wait to fill a batch (each "
                                        "request may wait this long; 1 ms gave lower latency than 5 ms at 1 client "
                                        "and no less throughput at 8, in two separate serve_load runs)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    threads: int = Field(1, ge=1, le=256, description="torch threads per model replica")
    model_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica")
    ingress_cpus: float = Field(0.25, ge=0, description="CPUs reserved per HTTP ingress replica")
    replicas: int = Field(1, ge=1, description="model replicas (fixed; serve/config.yaml autoscales)")
    split: bool = Field(False, description="the model in its own deployment behind the HTTP one (one more "
                                           "process hop a request; the two then scale apart)")
    ingress: Literal["auto", "direct", "haproxy", "proxy"] = Field(
        "auto", description="how HTTP reaches the replicas (`distillery serve`): direct = the one replica answers on "
        "`port` itself (Ray's direct ingress, no proxy hop); haproxy = HAProxy on `port` in front of the replicas' "
        "own ports; proxy = Ray Serve's Python proxy (Ray's default, ~4x less throughput on 2 cores); auto = direct "
        "for one replica, haproxy for more (proxy when no HAProxy binary is found)")
    access_log: bool = Field(False, description="Serve's per-request access log and INFO logs in the proxy and "
                             "replicas (off: WARNING and above only; the access log is CPU spent on every request)")


class RunConfig(_Section):
    """Everything one run needs. Field defaults are the only defaults."""

    run_dir: str = Field("runs/demo", min_length=1, description="where stages write their outputs (path or URI)")
    seed: int = 0
    warm_start: Optional[str] = Field(None, description="bundle of an earlier run to continue from: its teacher and "
                                      "labels are reused and the student starts from it (warmstart.py)")
    data: DataConfig = DataConfig()
    tasks: TasksConfig = TasksConfig()
    teacher: TeacherConfig = TeacherConfig()
    label: LabelConfig = LabelConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    tune: TuneConfig = TuneConfig()
    compress: CompressConfig = CompressConfig()
    report: ReportConfig = ReportConfig()


# ---------------------------------------------------------------------------------- load / dump
def with_trial(cfg: RunConfig, params: dict) -> RunConfig:
    """The run config with a Tune trial's sampled values put in their places (validated again): what
    the trial trained with, and what compress fine-tunes the winning trial's student with."""
    raw = cfg.model_dump(mode="json")
    for name in TUNED_PER_TASK:
        for task, value in params.get(name, {}).items():
            raw["tasks"][task][name] = float(value)
    if "lr" in params:
        raw["distill"]["lr"] = float(params["lr"])
    if "rank_weight" in params:
        raw["tasks"]["recommendation"]["rank_weight"] = float(params["rank_weight"])
    if "kd_class_power" in params:
        raw["tasks"]["intent"]["kd_class_power"] = float(params["kd_class_power"])
    if "dim" in params:
        raw["student"]["dim"] = int(params["dim"])
    if cfg.tune.epochs:
        raw["distill"]["epochs"] = cfg.tune.epochs
    return RunConfig.model_validate(raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3). Values are YAML, so `true`, `[1, 2]` and `null` work."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not key.sub=value (e.g. data.synthetic.users=500)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str], defaults: dict | None = None) -> dict:
    """Set each key.sub=value in `raw`. A section the file leaves out is first filled in from
    `defaults`, so that `tune.space.lr.low=1e-4` changes one bound, not the whole range."""
    for text in overrides:
        parts, value = parse_override(text)
        node, default = raw, defaults or {}
        for i, part in enumerate(parts[:-1]):
            default = default.get(part) if isinstance(default, dict) else None
            if part not in node:
                node[part] = copy.deepcopy(default) if isinstance(default, dict) else {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str, overrides: list[str] = ()) -> str:
    lines = [f"invalid config ({source}):"]
    set_by = {o.split("=", 1)[0].strip(): o for o in overrides}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p != "__root__")
        key = ".".join(str(p) for p in loc) or "(top level)"
        # the innermost override that set this key or a section above it: the file may not hold it
        origin = next((f" [from the override {set_by[k]}]" for k in
                       (".".join(str(p) for p in loc[:i]) for i in range(len(loc), 0, -1)) if k in set_by), "")
        if e["type"] == "extra_forbidden":
            known = _known_keys(RunConfig, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; known keys here: {', '.join(known)}"
            lines.append(f"  {key}: unknown key{extra}{origin}")
        elif e["type"] == "value_error":
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{origin}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r}){origin}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (configs/ has demo.yaml and amazon.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
        source = str(path)
    raw = apply_overrides(raw, list(overrides or []), RunConfig().model_dump(mode="json"))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, list(overrides or []))) from None


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON: equal configs hash equal whatever their key order."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
