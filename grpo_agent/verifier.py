"""A verifier learned from the corpus (issue #20): the 135M policy cannot judge its own answers, but tasks made
from the user's documents (tasks.py) carry the answer their passage states, so the policy's sampled answers to
them are labelled for free (evaluation.is_correct). A small cross-encoder, initialised from the bundled MiniLM
embedder, learns from those labels to read question + retrieved facts + answer and say how likely the answer
is right; it then scores answers to questions that carry no answer (the user's own), as the `verifier`
signal.

    examples = collect_examples(agent, tasks, k=8)   # sampled answers labelled by their task's corpus answer
    verifier = train_verifier(examples)               # a few epochs of binary cross-entropy on CPU
    verifier.save("runs/x/verifier")                  # safetensors + tokenizer + verifier.json
    Verifier.load("runs/x/verifier").score(question, facts, answers)   # probabilities in [0, 1]

Only files written by `save` (safetensors and JSON) are read back: nothing is unpickled.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .errors import GRPOAgentError
from .hub import no_progress_bars
from .retrieval import bundled_embedder_path

META = "verifier.json"
MAX_LENGTH = 256  # tokens of question + facts + answer; the facts are cut first


class VerifierError(GRPOAgentError):
    """A verifier that cannot be trained, loaded or used."""


@dataclass
class Example:
    """One sampled answer to a corpus task, labelled by whether it states the task's answer."""

    question: str
    facts: list[str]
    answer: str
    label: bool


def pair(question: str, facts: Sequence[str], answer: str) -> tuple[str, str]:
    """The cross-encoder's input: (question and facts, answer); truncation cuts the longer part first (the
    facts' end, unless the answer is longer)."""
    return f"{question} Facts: {' '.join(facts)}", answer


def collect_examples(agent, tasks: Sequence[dict], k: int = 8, seed: int = 0, batch: int = 8,
                     progress: bool = True) -> list[Example]:
    """Sample K answers per task that carries an answer (the agent's prompt and retrieval) and label each by
    whether it states that answer."""
    from .tasks import labelled_groups

    tasks, groups, contexts, labels = labelled_groups(agent, tasks, k=k, seed=seed, batch=batch, progress=progress)
    if not tasks:
        raise VerifierError("no task with an answer to learn from: make them with `grpo-agent tasks --index DIR`")
    return examples_from(tasks, groups, contexts, labels)


def examples_from(tasks: Sequence[dict], groups, contexts, labels) -> list[Example]:
    """One Example per sampled answer of tasks.labelled_groups' output."""
    return [Example(t["question"], [p.text for p in c.passages], x.text, bool(y))
            for t, g, c, ys in zip(tasks, groups, contexts, labels) for x, y in zip(g.completions, ys)]


class Verifier:
    """A cross-encoder that scores (question, retrieved facts, answer) as the probability the answer is right."""

    def __init__(self, model, meta: dict | None = None):
        self.model = model  # sentence_transformers.CrossEncoder with one output
        self.meta = dict(meta or {})

    @classmethod
    def untrained(cls, base: str = "default", max_length: int = MAX_LENGTH, seed: int = 0) -> "Verifier":
        """A fresh verifier: the embedder's encoder (bundled MiniLM, or a local directory) with a new head
        (initialised from `seed`)."""
        import torch

        torch.manual_seed(seed)
        path = bundled_embedder_path() if base == "default" else Path(base).expanduser()
        if not Path(path).is_dir():
            raise VerifierError(f"verifier base {base!r}: no such directory; use \"default\" (the bundled embedder) "
                                "or a local model directory. grpo-agent never downloads models")
        return cls(_cross_encoder(path, max_length), {"base": "all-MiniLM-L6-v2" if base == "default" else str(base)})

    @classmethod
    def load(cls, path: str | Path) -> "Verifier":
        """A verifier saved by `save` (its directory)."""
        path = Path(path).expanduser()
        meta_file = path / META
        if not meta_file.is_file():
            raise VerifierError(f"{path} holds no verifier ({META} missing): train one with "
                                "`grpo-agent verifier --index DIR --out DIR`")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        return cls(_cross_encoder(path, int(meta.get("max_length", MAX_LENGTH))), meta)

    def save(self, path: str | Path) -> Path:
        """Write the model (safetensors), its tokenizer and verifier.json into `path`."""
        path = Path(path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path), create_model_card=False, safe_serialization=True)
        (path / META).write_text(json.dumps({**self.meta, "max_length": self.model.max_seq_length}, indent=1) + "\n",
                                 encoding="utf-8")
        return path

    def score(self, question: str, facts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> list[float]:
        """The probability that each answer is right, given the question and the facts retrieved for it."""
        if not answers:
            return []
        return [float(p) for p in self.predict([pair(question, facts, a) for a in answers], batch_size)]

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
        import torch

        model = self.model.model
        model.eval()
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(pairs), batch_size):
                logits = model(**self._encode(pairs[i : i + batch_size])).logits[:, 0]
                out += torch.sigmoid(logits.float()).tolist()
        return out

    def _encode(self, pairs: Sequence[tuple[str, str]]):
        tok = self.model.tokenizer
        return tok([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", padding=True,
                   max_length=self.model.max_seq_length, return_tensors="pt")

    def fit(self, examples: Sequence[Example], epochs: int = 2, lr: float = 3e-5, batch_size: int = 16,
            seed: int = 0, progress: bool = True) -> list[float]:
        """Binary cross-entropy on the labelled examples (classes weighted to balance); returns each epoch's mean
        loss."""
        import torch
        from tqdm import tqdm

        if not examples:
            raise VerifierError("no examples to train the verifier on")
        positives = sum(e.label for e in examples)
        if positives in (0, len(examples)):
            raise VerifierError(f"all {len(examples)} sampled answers are {'right' if positives else 'wrong'}: "
                                "the verifier needs both; use more tasks or a higher temperature")
        torch.manual_seed(seed)
        model = self.model.model
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(examples) - positives) / positives))
        order = list(range(len(examples)))
        rng = random.Random(seed)
        losses = []
        steps = epochs * ((len(order) + batch_size - 1) // batch_size)
        with tqdm(total=steps, desc="training the verifier", unit="step", disable=not progress) as bar:
            for _ in range(epochs):
                rng.shuffle(order)
                model.train()
                total = 0.0
                for i in range(0, len(order), batch_size):
                    chunk = [examples[j] for j in order[i : i + batch_size]]
                    logits = model(**self._encode([pair(e.question, e.facts, e.answer) for e in chunk])).logits[:, 0]
                    loss = loss_fn(logits, torch.tensor([float(e.label) for e in chunk]))
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    total += loss.item() * len(chunk)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                losses.append(total / len(order))
        model.eval()
        self.meta.update(examples=len(examples), positives=positives, epochs=epochs, lr=lr, losses=losses)
        return losses


def train_verifier(examples: Sequence[Example], base: str = "default", **fit) -> Verifier:
    """A verifier trained on `examples` from the base encoder (see Verifier.fit for the options)."""
    verifier = Verifier.untrained(base, seed=fit.get("seed", 0))
    verifier.fit(examples, **fit)
    return verifier


def write_examples(path: str | Path, examples: Sequence[Example]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(e)) + "\n" for e in examples)


def read_examples(path: str | Path) -> list[Example]:
    with Path(path).open(encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]


def _cross_encoder(path, max_length: int):
    import logging

    if not (Path(path) / "model.safetensors").is_file():
        raise VerifierError(f"{path} has no model.safetensors: grpo-agent loads only safetensors weights (never a "
                            "pickled .bin); save the model with safetensors, or train one with `grpo-agent verifier`")
    import transformers
    from sentence_transformers import CrossEncoder

    level, st_logger = transformers.logging.get_verbosity(), logging.getLogger("sentence_transformers")
    st_level = st_logger.level
    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" report is expected,
    st_logger.setLevel(logging.ERROR)  # and so is "converting a SentenceTransformer model to a CrossEncoder"
    try:
        with no_progress_bars():
            return CrossEncoder(str(path), num_labels=1, max_length=max_length, device="cpu", local_files_only=True)
    except (OSError, ValueError) as e:
        raise VerifierError(f"could not load a cross-encoder from {path}: {e}") from e
    finally:
        transformers.logging.set_verbosity(level)
        st_logger.setLevel(st_level)
