"""The GRPO updater: fine-tune the policy from its own scored groups (LoRA by default, or full weights).

A step takes `groups_per_step` groups, packs their completions into micro-batches under a padded-token budget,
accumulates gradients over them, clips and applies AdamW. Within a micro-batch each distinct prompt runs once and
its keys and values feed all its completions (`share_prefix`, grpo.shared_prefix_logprobs), and the logits are
made `logit_chunk_tokens` at a time: the same loss and gradients as K full rows with whole logits, in less time
and memory (tools/bench_update.py). The loss is grpo.grpo_loss, normalised over the
whole step, so micro-batching (and running under torchrun on several processes) does not change the update.
Old log-probs are the sampler's own (no extra forward pass); with num_iterations > 1 later passes over the
same groups see an importance ratio away from 1. Groups whose scores did not vary are skipped. A step whose
loss or gradient is not finite is skipped and reported, leaving the weights as they were.

Checkpoints (adapter or weights and optimizer state in safetensors, step and consumed groups in JSON) are
written to a temporary directory and renamed; `resume` continues exactly where the last one stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .config import UpdateConfig
from .errors import UpdateError
from .grpo import completion_logprobs, grpo_loss, shared_prefix_logprobs
from .records import Group
from .rollout.decoding import shares_prefix
from .rundir import RunDir, append_jsonl, replacing



@dataclass
class Row:
    """One completion to train on, with the token ids and log-probs its sampler produced."""

    prompt: list[int]
    completion: list[int]
    old_logp: list[float]
    advantage: float
    temperature: float
    group_id: str
    mask: list[int] | None = None  # an episode's: 1 where the policy sampled the token (None: every token)


def trainable_rows(groups: Iterable[Group]) -> tuple[list[list[Row]], list[str]]:
    """Rows per usable group, and the ids of skipped groups (no variance, or nothing to train on)."""
    usable, skipped = [], []
    for g in groups:
        if g.zero_variance or all(not c.advantage for c in g.completions):
            skipped.append(g.group_id)
            continue
        rows = []
        for i, c in enumerate(g.completions):
            if c.advantage is None:
                raise UpdateError(f"group {g.group_id} completion {i} has no advantage: score the group first")
            if len(c.logprobs) != len(c.token_ids) or not c.token_ids:
                raise UpdateError(
                    f"group {g.group_id} completion {i}: {len(c.token_ids)} token ids but {len(c.logprobs)} "
                    "log-probs; train only on what the sampler produced"
                )
            if c.mask is not None and (len(c.mask) != len(c.token_ids) or not any(c.mask)):
                raise UpdateError(f"group {g.group_id} completion {i}: its mask has {len(c.mask)} entries, "
                                  f"{sum(c.mask)} sampled, for {len(c.token_ids)} token ids; log episodes as sampled")
            rows.append(Row(g.prompt_token_ids, c.token_ids, c.logprobs, c.advantage, g.temperature or 1.0,
                            g.group_id, c.mask))
        usable.append(rows)
    return usable, skipped


def trained_tokens(rows: Sequence[Row]) -> int:
    """The tokens a step trains on: every completion token, or only the unmasked ones (an episode's assistant
    turns)."""
    return sum(len(r.completion) if r.mask is None else sum(r.mask) for r in rows)


def pack(rows: Sequence[Row], budget: int, shared: bool = False) -> list[list[Row]]:
    """Consecutive micro-batches whose padded size fits `budget`: rows x (longest prompt + longest completion),
    or, `shared`, distinct prompts x longest prompt + rows x longest completion. A row larger than the budget gets
    a micro-batch of its own."""
    batches: list[list[Row]] = []
    current: list[Row] = []
    for row in rows:
        trial = current + [row]
        longest = max(len(r.prompt) for r in trial)
        prompts = len({tuple(r.prompt) for r in trial}) if shared else len(trial)
        size = prompts * longest + len(trial) * max(len(r.completion) for r in trial)
        if current and size > budget:
            batches.append(current)
            trial = [row]
        current = trial
    if current:
        batches.append(current)
    return batches


def collate(rows: Sequence[Row], pad_id: int, device: torch.device, shared: bool = False) -> dict[str, torch.Tensor]:
    """Prompts left-padded and completions right-padded, side by side: input_ids (B, Lp + T). `shared`: each
    distinct prompt once, prompt_ids (G, Lp), the prompt of each row (owner, B) and completion_ids (B, T)."""
    lp, t = max(len(r.prompt) for r in rows), max(len(r.completion) for r in rows)
    old = torch.zeros((len(rows), t))
    trained = torch.zeros((len(rows), t))  # the completion tokens the loss sees: an episode's sampled ones only
    for i, r in enumerate(rows):
        old[i, : len(r.completion)] = torch.tensor(r.old_logp)
        trained[i, : len(r.completion)] = 1.0 if r.mask is None else torch.tensor(r.mask, dtype=torch.float32)
    batch = {"old_logp": old, "mask": trained,
             "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32)}
    if shared:
        prompts = list(dict.fromkeys(tuple(r.prompt) for r in rows))
        batch["prompt_ids"], batch["prompt_mask"] = _padded(prompts, lp, pad_id, left=True)
        batch["completion_ids"], batch["completion_mask"] = _padded([r.completion for r in rows], t, pad_id)
        batch["owner"] = torch.tensor([prompts.index(tuple(r.prompt)) for r in rows])
    else:
        ids, attn = _padded([r.prompt for r in rows], lp, pad_id, left=True)
        completion_ids, completion_mask = _padded([r.completion for r in rows], t, pad_id)
        batch["input_ids"] = torch.cat([ids, completion_ids], 1)
        batch["attention_mask"] = torch.cat([attn, completion_mask], 1)
    return {k: v.to(device) for k, v in batch.items()}


def _padded(seqs: Sequence[Sequence[int]], width: int, pad_id: int, left: bool = False):
    """(N, width) ids padded on the left or right, and the mask of the real tokens."""
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = torch.tensor(list(s), dtype=torch.long), 1
    return ids, mask


class GRPOUpdater:
    """Trains a policy's model from scored groups; see the module docstring."""

    def __init__(self, policy, cfg: UpdateConfig | None = None, output_dir: str | os.PathLike | None = None):
        self.cfg = cfg = cfg or UpdateConfig()
        self.policy = policy
        self.output_dir = Path(output_dir) if output_dir else None
        torch.manual_seed(cfg.seed)
        model = policy.model
        if cfg.lora:
            import warnings

            from peft import LoraConfig, PeftModel, get_peft_model

            # peft still calls a transformers method that warns it is renamed; nothing for a user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

            if not isinstance(model, PeftModel):
                model = get_peft_model(model, LoraConfig(
                    r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"))
            self.ref_model = None  # the base model with the adapter disabled
        else:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
        policy.model = self.model = model  # the agent samples from the adapted model
        self.ref_adapter: list[torch.Tensor] | None = None  # LoRA weights of a reset reference (None: the base)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.step = 0
        self.consumed: list[list] = []  # [pass, group_id] pairs already trained on, in order
        self.rank, self.world = 0, 1
        self._tensorboard = None  # a SummaryWriter once used, False when tensorboard is not installed
        self.train_model = model
        # full attention on transformers' interface, and a cache kept in training (layer checkpointing drops it)
        self.share_prefix = (cfg.share_prefix and shares_prefix(model)
                             and not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from torch.nn.parallel import DistributedDataParallel

            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.train_model = DistributedDataParallel(model)

    # ----- training ----------------------------------------------------------------------------------
    def train(self, groups: Sequence[Group], on_step: Callable[[dict], None] | None = None,
              max_steps: int | None = None) -> list[dict]:
        """Train on scored groups (num_iterations passes); returns one metrics dict per optimizer step.

        Steps already recorded as consumed (after `resume`) are not repeated; `max_steps` stops early.
        """
        usable, skipped = trainable_rows(groups)
        done = {(p, gid) for p, gid in self.consumed}
        history = []
        chunks = [usable[i : i + self.cfg.groups_per_step] for i in range(0, len(usable), self.cfg.groups_per_step)]
        for p in range(self.cfg.num_iterations):
            for chunk in chunks:
                ids = [rows[0].group_id for rows in chunk]
                if all((p, gid) in done for gid in ids):
                    continue
                if max_steps is not None and len(history) >= max_steps:
                    self.train_model.eval()
                    return history
                metrics = self._step([r for rows in chunk for r in rows])
                metrics.update(pass_index=p, groups=len(chunk), skipped_groups=len(skipped))
                self.consumed += [[p, gid] for gid in ids]
                history.append(metrics)
                self._log(metrics)
                if on_step:
                    on_step(metrics)
        self.train_model.eval()  # back to sampling mode (no dropout): what the agent and the eval expect
        return history

    def _step(self, rows: list[Row]) -> dict:
        t0 = time.perf_counter()
        n_tokens = trained_tokens(rows)
        loss_sum, kl_sum, clip_sum, ent_sum = self.gradients(rows)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        advantages = torch.tensor([r.advantage for r in rows])
        seconds = time.perf_counter() - t0
        return {
            "step": self.step, "loss": loss_sum, "kl": kl_sum / n_tokens, "clip_fraction": clip_sum / n_tokens,
            "entropy": ent_sum / n_tokens, "grad_norm": grad_norm, "advantage_mean": float(advantages.mean()),
            "advantage_std": float(advantages.std()) if len(rows) > 1 else 0.0, "completions": len(rows),
            "tokens": n_tokens, "tokens_per_s": n_tokens / seconds, "seconds": seconds,
            "skipped_nonfinite": not finite,
        }

    def gradients(self, rows: list[Row]) -> list[float]:
        """One step's gradients, accumulated in the trained parameters' .grad over its micro-batches (and
        processes), not applied; returns the step's loss and its token-weighted KL, clip fraction and entropy
        sums."""
        local = rows[self.rank :: self.world]  # under torchrun each process takes every world-th row
        n_seqs = len(rows)
        n_tokens = trained_tokens(rows)
        max_len = max(len(r.completion) for r in rows)
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = kl_sum = clip_sum = ent_sum = 0.0
        batches = pack(local, self.cfg.micro_batch_tokens, shared=self.share_prefix)
        if not batches:  # more processes than rows: join the gradient all-reduce with a zero loss
            sum(p.sum() for p in self.params).mul(0.0).backward()
        for i, mb in enumerate(batches):
            sync = i == len(batches) - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.train_model.no_sync()
            with ctx:
                parts, entropy, b = self._micro_batch_loss(mb, n_seqs, n_tokens, max_len)
                (parts.loss * self.world).backward()  # DDP averages over processes: undo it
            tokens = float(b["mask"].sum())
            loss_sum += parts.loss.item()
            kl_sum += parts.kl * tokens
            clip_sum += parts.clip_fraction * tokens
            ent_sum += entropy * tokens
        return self._all_reduce([loss_sum, kl_sum, clip_sum, ent_sum])

    def _micro_batch_loss(self, mb: list[Row], n_seqs: int, n_tokens: int, max_len: int):
        """The micro-batch's share of the step loss, normalised over the whole step."""
        cfg = self.cfg
        b = collate(mb, self.policy.pad_token_id, self.policy.device, shared=self.share_prefix)
        temperature = mb[0].temperature
        if any(r.temperature != temperature for r in mb):
            raise UpdateError("a micro-batch mixes sampling temperatures; sample a run's groups at one temperature")
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast and b["mask"].is_cpu)
        with autocast:
            ref = None
            if cfg.beta > 0:  # first, so that no weight is swapped while the policy's graph is alive
                with torch.no_grad():
                    ref = self._reference_logprobs(b, temperature)
            logp, entropy = self._logprobs(self.train_model, b, temperature, with_entropy=True)
        # Normalise over the step: grpo and dr_grpo average over the step's sequences; bnpo and dapo over its
        # completion tokens (identical within one step, as TRL's with no accumulation).
        loss_type, scale, num_items = cfg.loss_type, len(mb) / n_seqs, None
        if loss_type in ("bnpo", "dapo"):
            loss_type, scale, num_items = "dapo", 1.0, n_tokens
        parts = grpo_loss(
            logp, b["old_logp"], b["advantages"], b["mask"], ref_logp=ref, beta=cfg.beta,
            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, loss_type=loss_type,
            importance_sampling_level=cfg.importance_sampling_level, max_completion_length=max_len,
            num_items=num_items, use_bias_correction_kl=cfg.use_bias_correction_kl,
        )
        if loss_type in ("grpo", "dr_grpo"):  # averaged over the micro-batch's B: reweight to the step's
            parts.loss = parts.loss * scale
        mean_entropy = float((entropy.detach() * b["mask"]).sum() / b["mask"].sum().clamp(min=1))
        return parts, mean_entropy, b

    def _logprobs(self, model, b: dict, temperature: float, with_entropy: bool = False):
        """The (B, T) completion log-probs (and entropies) of a collated micro-batch under `model`."""
        chunk = self.cfg.logit_chunk_tokens
        if "owner" in b and self.share_prefix:
            out = shared_prefix_logprobs(model, b["prompt_ids"], b["prompt_mask"], b["owner"], b["completion_ids"],
                                         b["completion_mask"], temperature, with_entropy, chunk)
            if out is not None:
                return out
            self.share_prefix = False  # logits other than the output head of the hidden states: full rows from now
            b.update(input_ids=torch.cat([b["prompt_ids"].index_select(0, b["owner"]), b["completion_ids"]], 1),
                     attention_mask=torch.cat([b["prompt_mask"].index_select(0, b["owner"]), b["completion_mask"]], 1))
        return completion_logprobs(model, b["input_ids"], b["attention_mask"], b["mask"].shape[1], temperature,
                                   with_entropy, chunk)

    def _reference_logprobs(self, b: dict, temperature: float) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, b, temperature)[0]
        if self.ref_adapter is not None:  # the reference's adapter weights in place, then the policy's back
            training = self.model.training
            try:
                with self._weights_kept():
                    self.model.eval()  # no LoRA dropout: the reference is deterministic
                    for p, r in zip(self.params, self.ref_adapter):
                        p.data.copy_(r)
                    return self._logprobs(self.model, b, temperature)[0]
            finally:
                self.model.train(training)
        with self.model.disable_adapter():
            return self._logprobs(self.model, b, temperature)[0]

    @contextlib.contextmanager
    def _weights_kept(self):
        """Whatever is written into the trained weights inside, they are as before afterwards."""
        current = [p.detach().clone() for p in self.params]
        try:
            yield
        finally:
            for p, c in zip(self.params, current):
                p.data.copy_(c)

    def reset_reference(self, adapter: str | os.PathLike) -> None:
        """Make the LoRA adapter saved in `adapter` (a directory as save_pretrained writes it) the KL reference
        from now on: a frozen copy of its weights. The caller names the reference across restarts (the loop in
        its state.json). LoRA only: the reference of full fine-tuning stays the starting model."""
        if not self.cfg.lora:
            raise UpdateError("resetting the KL reference needs a LoRA update (update.lora = true)")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        with self._weights_kept():  # peft maps the saved names onto the model's weights; read them, put back ours
            try:
                result = set_peft_model_state_dict(self.model, load_file(str(Path(adapter) / "adapter_model.safetensors")))
            except (OSError, RuntimeError) as e:
                raise UpdateError(f"adapter {adapter} could not be loaded as the reference ({e})") from e
            if getattr(result, "unexpected_keys", None):
                raise UpdateError(f"adapter {adapter} does not match the trained adapter: {result.unexpected_keys[:3]}")
            self.ref_adapter = [p.detach().clone() for p in self.params]

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def _log(self, metrics: dict) -> None:
        """Append the step's metrics to output_dir/metrics.jsonl, and to TensorBoard when it is installed."""
        if self.output_dir is None or self.rank != 0:
            return
        append_jsonl(RunDir(self.output_dir).metrics_file, metrics)
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tensorboard = False
        if self._tensorboard:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"update/{key}", value, metrics["step"])
            self._tensorboard.flush()

    # ----- checkpoints ---------------------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the trained LoRA adapter (what an agent serves) to `directory`, replacing it atomically."""
        if not self.cfg.lora:
            raise UpdateError("save_adapter writes a LoRA adapter; with update.lora = false save_checkpoint writes "
                              "the full weights")
        with replacing(directory) as tmp:
            self.model.save_pretrained(tmp)
        return Path(directory)

    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        """Write checkpoint-<step> atomically (temporary directory, then rename); keep the two newest."""
        from safetensors.torch import save_file, save_model

        root = Path(directory) if directory else self.output_dir
        if root is None:
            raise UpdateError("no directory for checkpoints: pass output_dir to GRPOUpdater or a directory here")
        if self.rank != 0:
            return root / f"checkpoint-{self.step:06d}"
        final = root / f"checkpoint-{self.step:06d}"
        # Re-saving a step sets the complete old copy aside until the new one has its name (latest_checkpoint
        # finds a copy set aside when a kill came in between).
        with replacing(final) as tmp:
            tmp.mkdir()
            if self.cfg.lora:
                self.model.save_pretrained(tmp / "adapter")  # adapter_model.safetensors + adapter_config.json
            else:
                save_model(self.model, str(tmp / "model.safetensors"))  # handles tied embeddings
            tensors, layout = _optimizer_to_tensors(self.optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = {"step": self.step, "consumed": self.consumed, "optimizer": layout, "config": asdict(self.cfg)}
            (tmp / "state.json").write_text(json.dumps(state) + "\n", encoding="utf-8")
        for old in sorted(root.glob("checkpoint-*"))[:-2]:
            _remove_checkpoint(old)
        return final

    def resume(self, directory: str | os.PathLike | None = None) -> bool:
        """Load the newest complete checkpoint under `directory`; False when there is none."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, load_model

        root = Path(directory) if directory else self.output_dir
        found = latest_checkpoint(root) if root else None
        if found is None:
            return False
        try:
            state = json.loads((found / "state.json").read_text(encoding="utf-8"))
            if self.cfg.lora:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.model, load_file(str(found / "adapter" / "adapter_model.safetensors")))
            else:
                load_model(self.model, str(found / "model.safetensors"))
            _optimizer_from_tensors(self.optimizer, load_file(str(found / "optimizer.safetensors")), state["optimizer"])
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
            raise UpdateError(f"checkpoint {found} could not be loaded ({e}); remove it to fall back to an older one") from e
        self.step, self.consumed = state["step"], state["consumed"]
        return True


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, its state.json first, so a half-deleted one never looks complete."""
    (path / "state.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (one holding a state.json) under `root`, if any. A copy set aside while
    its step was being re-saved counts when the kill came before the new one took its name."""
    found: dict[str, Path] = {}
    for aside in Path(root).glob(".checkpoint-*.old-*"):
        if (aside / "state.json").is_file():
            found.setdefault(aside.name[1:].split(".old-")[0], aside)
    for path in Path(root).glob("checkpoint-*"):
        if (path / "state.json").is_file():
            found[path.name] = path
    return found[max(found)] if found else None


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as flat tensors (for safetensors) plus a JSON layout; no pickle."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], layout: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})


def train_with_checkpoints(updater: GRPOUpdater, groups: Sequence[Group], directory: Path, every: int = 1,
                           desc: str = "update", progress: bool = True) -> list[dict]:
    """updater.train with a progress bar, a checkpoint every `every` steps and one after the last step."""
    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, unit="step", disable=not progress, leave=False)

    def on_step(m: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{m['kl']:.4f}")
        if updater.step % every == 0:
            updater.save_checkpoint(directory)

    history = updater.train(groups, on_step=on_step)
    bar.close()
    if history and updater.step % every:
        updater.save_checkpoint(directory)
    return history
