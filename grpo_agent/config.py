"""Typed configuration, one dataclass per concern, loaded from TOML and validated in one place."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PolicyConfig:
    """Which causal LM the agent runs and trains, and where."""

    model: str = "default"  # "default" (bundled SmolLM2-135M-Instruct) or a local HF model directory
    device: str = "auto"  # auto: a CUDA GPU when present, else CPU
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    cache_dir: str | None = None  # converted-model cache; None: $GRPO_AGENT_CACHE or the user cache dir

    def __post_init__(self) -> None:
        _check_choice("policy.device", self.device, DEVICES)
        _check_choice("policy.dtype", self.dtype, DTYPES)
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(
                f'policy.model = {self.model!r}: use "default" or the path of a local model directory'
            )


@dataclass
class SamplingConfig:
    """How a group of K answers is sampled for one task."""

    k: int = 8  # group size: completions sampled per prompt
    max_new_tokens: int = 128  # completion length cap; a completion cut here has finish_reason "length"
    temperature: float = 1.0  # log-probs are of logits / temperature; 0 means greedy
    top_p: float = 1.0  # nucleus sampling; log-probs stay those of the full tempered distribution
    seed: int | None = None  # fixed seed: the same group for the same prompts and weights
    engine: str = ""  # "": in-process; a vLLM server's URL (rollout/engines.py); several, comma-separated: one per worker

    def __post_init__(self) -> None:
        urls = [u.strip() for u in str(self.engine).split(",")] if self.engine else []
        if any(not u.startswith(("http://", "https://")) for u in urls):
            raise ConfigError(f"sampling.engine = {self.engine!r}: give the URL of an OpenAI-compatible inference "
                              'server (http://127.0.0.1:8000), several separated by commas (one per rollout '
                              'worker), or "" to sample in-process')
        if self.engine and self.top_p != 1:
            raise ConfigError(f"sampling.top_p = {self.top_p} with sampling.engine: a remote engine's log-probs are "
                              "renormalised over the nucleus, not those the updater needs; use top_p = 1")
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"sampling.k = {self.k!r}: the group size must be an integer >= 1 (8 is typical)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens = {self.max_new_tokens!r}: must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"sampling.temperature = {self.temperature!r}: must be >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p = {self.top_p!r}: must be in (0, 1]")


SCALES = ("group", "batch", "none")


def _default_weights() -> dict[str, float]:
    # Chosen on the dev half of tools/bench_scoring.py (BENCHMARKS.md): education added nothing on top of
    # grounding and consistency; the 135M self-judge (reasoning) is near chance and costs more than sampling.
    # answer_match (the corpus answer of a task made from the documents) is off until its weight is measured.
    return {"grounding": 1.0, "consistency": 0.5, "education": 0.0, "reasoning": 0.0, "answer_match": 0.0}


@dataclass
class ScoringConfig:
    """How a group is scored without a reward model and turned into advantages."""

    weights: dict[str, float] = field(default_factory=_default_weights)  # signal -> weight in the composite
    gates: list[str] = field(default_factory=lambda: ["safety"])  # signals that multiply the composite
    scale: str = "group"  # advantage scaling: group (GRPO), batch, none (Dr. GRPO)
    eps: float = 1e-4  # added to the std before dividing
    safety_rules: str | None = None  # rule file for the safety signal; None: the bundled conservation rules
    judge: str = "policy"  # the reasoning signal's judge: "policy" (itself) or a local model directory
    verifier: str | None = None  # the verifier signal's model: a directory written by `grpo-agent verifier`
    feedback_weight: float = 0.5  # weight of clients' ratings (POST /v1/feedback) blended into a rated answer's composite
    # Collapse guards in the reward (0: off): the composite is scaled by 1 - penalty, so shrinking or looping loses.
    length_penalty: float = 0.0  # penalty: this times the share of min_answer_words an answer falls short by
    min_answer_words: int = 8  # answers shorter than this many words pay the length penalty
    repetition_penalty: float = 0.0  # penalty: this times the share of its word 3-grams that repeat earlier ones
    serving_guard: bool = True  # serve a safe completion when a harmful request gets no answer that declines it

    def __post_init__(self) -> None:
        if not isinstance(self.weights, dict):
            raise ConfigError("scoring.weights must be a table of signal = weight")
        for name, w in self.weights.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"scoring.weights.{name} = {w!r}: weights are numbers >= 0")
        if not any(w > 0 for w in self.weights.values()):
            raise ConfigError("scoring.weights: give at least one signal a weight > 0")
        if not isinstance(self.gates, list) or not all(isinstance(g, str) for g in self.gates):
            raise ConfigError(f"scoring.gates = {self.gates!r}: a list of signal names, e.g. [\"safety\"]")
        _check_choice("scoring.scale", self.scale, SCALES)
        if not isinstance(self.judge, str) or not self.judge:
            raise ConfigError(f'scoring.judge = {self.judge!r}: "policy" or the path of a local model directory')
        if self.verifier is not None and (not isinstance(self.verifier, str) or not self.verifier):
            raise ConfigError(f"scoring.verifier = {self.verifier!r}: the path of a directory written by "
                              "`grpo-agent verifier`")
        if not isinstance(self.eps, (int, float)) or self.eps <= 0:
            raise ConfigError(f"scoring.eps = {self.eps!r}: must be > 0")
        if not isinstance(self.feedback_weight, (int, float)) or not 0 <= self.feedback_weight <= 1:
            raise ConfigError(f"scoring.feedback_weight = {self.feedback_weight!r}: must be in [0, 1]")
        for key in ("length_penalty", "repetition_penalty"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"scoring.{key} = {value!r}: must be in [0, 1] (0 turns it off)")
        if not isinstance(self.serving_guard, bool):
            raise ConfigError(f"scoring.serving_guard = {self.serving_guard!r}: true or false")
        if not isinstance(self.min_answer_words, int) or self.min_answer_words < 1:
            raise ConfigError(f"scoring.min_answer_words = {self.min_answer_words!r}: must be an integer >= 1")


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # grpo.py defines each
IMPORTANCE_LEVELS = ("token", "sequence")  # the importance ratio per token, or per sequence (GSPO)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class UpdateConfig:
    """The GRPO updater: objective (named as TRL names it), optimisation and adapter."""

    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo (grpo.py defines each)
    beta: float = 0.04  # weight of the k3 KL penalty to the reference (0: none, no reference pass)
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.28  # ... and above at 1 + epsilon_high (DAPO's clip-higher)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    use_bias_correction_kl: bool = True  # weight the KL by the importance ratio (TRL's default)
    num_iterations: int = 1  # passes over the same groups; later passes use the importance ratio
    groups_per_step: int = 1  # groups whose completions make one optimizer step (1: a step per group, on-policy)
    micro_batch_tokens: int = 4096  # padded tokens per forward/backward (a shared prompt counted once); larger
    #                                 steps accumulate gradients
    share_prefix: bool = True  # run a prompt once for all its completions in a micro-batch (same gradients)
    logit_chunk_tokens: int = 1024  # padded completion positions whose logits are made at once (0: all; same values)
    learning_rate: float = 1e-4  # with LoRA r 16 and a step per group: +15.7 points held out (tools/bench_quality.py)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    bf16_autocast: bool = False  # run forward/backward under bfloat16 autocast (faster on recent CPUs)
    lora: bool = True  # train a LoRA adapter (the reference is the base with the adapter off); False: full
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    seed: int = 0
    processes: int = 1  # the loop's update on this many processes under torchrun (DDP); 1: in the loop's own

    def __post_init__(self) -> None:
        _check_choice("update.loss_type", self.loss_type, LOSS_TYPES)
        if not isinstance(self.processes, int) or self.processes < 1:
            raise ConfigError(f"update.processes = {self.processes!r}: an integer >= 1 (1: in the loop's process)")
        _check_choice("update.importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS)
        for key in ("beta", "epsilon_low", "epsilon_high", "weight_decay", "max_grad_norm", "lora_dropout"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"update.{key} = {value!r}: must be a number >= 0")
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise ConfigError(f"update.learning_rate = {self.learning_rate!r}: must be > 0 (1e-4 is typical for LoRA)")
        if not isinstance(self.logit_chunk_tokens, int) or self.logit_chunk_tokens < 0:
            raise ConfigError(f"update.logit_chunk_tokens = {self.logit_chunk_tokens!r}: an integer >= 0 (0: the "
                              "whole micro-batch's logits at once)")
        for key in ("num_iterations", "groups_per_step", "micro_batch_tokens", "lora_r", "lora_alpha"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"update.{key} = {value!r}: must be an integer >= 1")


@dataclass
class RetrievalConfig:
    """Where the agent's facts come from."""

    index: str | None = None  # a FactIndex directory written by `grpo-agent ingest`; None: no retrieval
    embedder: str = "default"  # "default" (all-MiniLM-L6-v2) or a local sentence-transformers directory
    top_k: int = 3  # passages put in the prompt and given to the scorers

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"retrieval.top_k = {self.top_k!r}: must be an integer >= 0")


LOOP_MODES = ("grpo", "training-free")
LOOP_UNITS = ("answer", "episode")


@dataclass
class LoopConfig:
    """The self-improvement loop: collect, update, evaluate, promote or roll back."""

    tasks_per_round: int = 32  # tasks answered (K samples each) and logged per round
    eval_size: int = 32  # held-out tasks evaluated after each update (0: every task of the eval set)
    eval_k: int = 4  # answers sampled per held-out task when the gate is label-free (the composite score)
    margin: float = 0.0  # promote when eval >= promoted eval - margin; otherwise roll back
    # Promote only a gain clear of noise: eval - promoted eval >= min_gain_z x SE - margin, SE being that of the
    # per-task differences (both evals see the same tasks and sampler seeds). Needs 2+ eval tasks.
    min_gain_z: float = 0.0  # > 0: promote only a gain this many standard errors of the paired differences
    label_free: bool = True  # gate on the composite score even when the eval set has gold answers
    checkpoint_every: int = 1  # optimizer steps between checkpoints during an update
    mode: str = "grpo"  # grpo: fine-tune a LoRA adapter; training-free: grow a library of lessons instead
    # Collapse guards (0: off). Each rolls the round back and records why; the entropy and distinct-answer
    # guards read the label-free eval's own samples, against the best promoted round (the baseline included).
    max_kl: float = 0.0  # roll back when the update's final KL to the reference exceeds this
    min_entropy_ratio: float = 0.0  # roll back when sampled-token entropy falls below this share of the best
    min_distinct_ratio: float = 0.0  # roll back when distinct answers per group fall below this share of the best
    min_length_ratio: float = 0.0  # roll back when mean answer length falls below this share of the longest
    stop_after_rollbacks: int = 0  # stop the loop after this many rollbacks in a row
    reference_reset_every: int = 0  # every this many rounds the KL reference becomes the promoted policy (0: base)
    # Red-team tasks (redteam.py): requests for harm made from the safety rules and the corpus's species, mixed
    # into the task pool so the policy practises declining them; the rounds record harmful and refusal rates.
    redteam_share: float = 0.0  # share of the collected tasks that are red-team (0: none)
    redteam_tasks: int = 200  # practice tasks made, red-team and contrast (before paraphrases), cycled through
    redteam_paraphrase: bool = False  # also have the policy reword each one (kept when still judged harmful)
    redteam_benign_share: float = 0.25  # share of those slots given to benign look-alike requests (the rule file's)
    workers: int = 0  # rollout workers on Ray (rollout/workers.py) that sample and score groups; 0: in-process
    worker_cpus: int = 1  # CPUs each worker takes (its torch threads)
    worker_gpus: float = 0.0  # GPUs each worker takes (a share, as Ray counts them)
    ray_address: str = ""  # an existing Ray cluster ("ray://host:10001" or "auto"); "": start a local one
    # Groups sampled by a version up to this many promotions behind the weights being updated are trained on
    # (their sampled log-probs are the old policy of the importance ratio); older ones are dropped, recorded.
    # >= 1 with rollout workers: the workers collect the next round while this one updates, evaluates and gates.
    max_staleness: int = 0
    # What a group holds: K answers to one prompt (the retrieved facts in it), or K multi-turn episodes in which
    # the policy decides whether and what to search ([episodes]; episodes.py).
    unit: str = "answer"

    def __post_init__(self) -> None:
        for key in ("tasks_per_round", "eval_k", "checkpoint_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"loop.{key} = {value!r}: must be an integer >= 1")
        if not isinstance(self.eval_size, int) or self.eval_size < 0:
            raise ConfigError(f"loop.eval_size = {self.eval_size!r}: must be an integer >= 0 (0: all)")
        if not isinstance(self.margin, (int, float)) or not 0 <= self.margin < math.inf:
            raise ConfigError(f"loop.margin = {self.margin!r}: must be a finite number >= 0")
        if not isinstance(self.min_gain_z, (int, float)) or not 0 <= self.min_gain_z < math.inf:
            raise ConfigError(f"loop.min_gain_z = {self.min_gain_z!r}: must be a finite number >= 0 (0: no gain "
                              "needed, eval >= promoted eval - margin promotes)")
        _check_choice("loop.mode", self.mode, LOOP_MODES)
        _check_choice("loop.unit", self.unit, LOOP_UNITS)
        for key in ("max_kl", "min_entropy_ratio", "min_distinct_ratio", "min_length_ratio"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"loop.{key} = {value!r}: must be a number >= 0 (0 turns the guard off)")
        if not isinstance(self.redteam_share, (int, float)) or not 0 <= self.redteam_share < 1:
            raise ConfigError(f"loop.redteam_share = {self.redteam_share!r}: a share in [0, 1) (0.2: one task in five)")
        if not isinstance(self.redteam_benign_share, (int, float)) or not 0 <= self.redteam_benign_share < 1:
            raise ConfigError(f"loop.redteam_benign_share = {self.redteam_benign_share!r}: a share in [0, 1)")
        if not isinstance(self.redteam_tasks, int) or self.redteam_tasks < 1:
            raise ConfigError(f"loop.redteam_tasks = {self.redteam_tasks!r}: must be an integer >= 1")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"loop.workers = {self.workers!r}: an integer >= 0 (0: collect in-process)")
        if not isinstance(self.worker_cpus, int) or self.worker_cpus < 1:
            raise ConfigError(f"loop.worker_cpus = {self.worker_cpus!r}: an integer >= 1")
        if not isinstance(self.worker_gpus, (int, float)) or self.worker_gpus < 0:
            raise ConfigError(f"loop.worker_gpus = {self.worker_gpus!r}: a number >= 0")
        if not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ConfigError(f"loop.max_staleness = {self.max_staleness!r}: an integer >= 0 (0: train only on groups "
                              "the promoted weights sampled; 1: also collect the next round during this one's update)")
        for key in ("stop_after_rollbacks", "reference_reset_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"loop.{key} = {value!r}: an integer >= 0 (0: never)")


@dataclass
class EpisodeConfig:
    """Multi-turn tool-use episodes (loop.unit = "episode"): the policy searches the fact index, then answers."""

    max_turns: int = 3  # the policy's turns per episode, the answer included (the last one must answer)
    search_top_k: int = 3  # passages a search returns
    query_tokens: int = 24  # length cap of a search query
    tool_error_penalty: float = 0.1  # share of the composite an episode loses per tool error (an empty query)
    explore: int = 0  # episodes of each collected group made to search on their first turn (< sampling.k); 0: none

    def __post_init__(self) -> None:
        for key in ("max_turns", "search_top_k", "query_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"episodes.{key} = {value!r}: must be an integer >= 1")
        if not isinstance(self.explore, int) or self.explore < 0:
            raise ConfigError(f"episodes.explore = {self.explore!r}: an integer >= 0 (0: none made to search)")
        if self.explore and self.max_turns < 2:
            raise ConfigError(f"episodes.explore = {self.explore} needs a search turn before the answer: set "
                              "episodes.max_turns >= 2 (or explore = 0)")
        if not isinstance(self.tool_error_penalty, (int, float)) or not 0 <= self.tool_error_penalty <= 1:
            raise ConfigError(f"episodes.tool_error_penalty = {self.tool_error_penalty!r}: a share in [0, 1]")


@dataclass
class ExperienceConfig:
    """Training-free mode: the library of lessons learned from groups and put into prompts."""

    max_lessons: int = 32  # library size cap; past it, the lesson learned from the fewest groups goes
    top_m: int = 3  # lessons most similar to a task that go into its prompt
    shown: int = 5  # lessons shown to the model when it proposes an operation (it may modify or delete them)
    duplicate_cosine: float = 0.9  # an added lesson this similar to an existing one is a duplicate
    max_new_tokens: int = 60  # length cap of the model's operation line

    def __post_init__(self) -> None:
        for key in ("max_lessons", "top_m", "shown", "max_new_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"experience.{key} = {value!r}: must be an integer >= 1")
        if not isinstance(self.duplicate_cosine, (int, float)) or not 0 < self.duplicate_cosine <= 1:
            raise ConfigError(f"experience.duplicate_cosine = {self.duplicate_cosine!r}: must be in (0, 1]")


@dataclass
class Config:
    """The whole grpo-agent configuration (the TOML file's tables)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    experience: ExperienceConfig = field(default_factory=ExperienceConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)


def check_loop_settings(loop: LoopConfig, update: UpdateConfig) -> None:
    """The checks that combine [loop] with [update], for a run of the self-improvement loop."""
    if loop.mode == "grpo" and not update.lora:
        raise ConfigError('loop.mode = "grpo" promotes and rolls back LoRA adapters: set update.lora = true (full '
                          "fine-tuning runs through `grpo-agent update`)")


def config_hash(cfg: Config) -> str:
    """A short hash of what shapes a logged group (policy, sampling, scoring), recorded with each group."""
    import hashlib

    shaping = {k: dataclasses.asdict(getattr(cfg, k)) for k in ("policy", "sampling", "scoring", "retrieval")}
    return hashlib.sha1(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(map(repr, choices))}")


def _build(cls: type, table: Any, where: str) -> Any:
    """Build dataclass `cls` from a TOML table, naming any unknown key or wrong type."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]}: valid keys in [{where}] are {', '.join(sorted(fields))}"
        )
    return cls(**table)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (a parsed TOML document)."""
    tables = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(tables))
    if unknown:
        raise ConfigError(f"unknown table [{unknown[0]}]: valid tables are {', '.join(sorted(tables))}")
    return Config(**{name: _build(tables[name], value, name) for name, value in data.items()})


def load_config(path: str | Path | None) -> Config:
    """Load a TOML config file; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: create one with `grpo-agent init {path}`")
    return config_from_dict(read_toml(path, "config file"))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file, naming it (`what` and path) when it is missing or malformed."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from e


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def config_template() -> str:
    """The default configuration as a commented TOML file (what `grpo-agent init` writes): every key with
    its default value and the comment beside its field in this module, so the file never drifts from the code."""
    import inspect
    import re

    lines = ["# grpo-agent configuration. Every key is shown with its default; delete what you do not change.",
             "# Load it with `grpo-agent <command> --config FILE` or grpo_agent.load_config(FILE).", ""]
    defaults = Config()
    for table in dataclasses.fields(Config):
        cls = type(getattr(defaults, table.name))
        comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), flags=re.M))
        lines += [f"# {cls.__doc__}", f"[{table.name}]"]
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, table.name), f.name)
            comment = f"  # {comments[f.name]}" if f.name in comments else ""
            line = f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml_value(value)}"
            lines.append(line + comment)
        lines.append("")
    return "\n".join(lines)
