"""Medusa heads' training objective, held-out evaluation and recipe (a library for
``experiments.train_medusa`` and ``experiments.medusa_tree``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from drafters.draft_vocab import soft_cross_entropy
from drafters.medusa_heads import (
    FILES,
    MedusaHeads,
    MedusaHeadsError,
    check_target,
    default_heads_dir,
    load_heads,
    save_heads,
)
from experiments.head_data import generate_rows
from experiments.head_teachers import MemoTeacher, argmax_teacher, teacher
from experiments.head_training import HeadRecipe, target_dir_name
from specdec.errors import ConfigError

LOSSES = ("soft", "hard")
RANKS = 10  # per-rank accuracies kept in eval.json (they shape the default tree)


def medusa_loss(head_logits: torch.Tensor, target_logits: torch.Tensor, decay: float, ids: torch.Tensor | None = None):
    """``loss=soft``: the weighted loss over heads and each head's loss (``loss=hard`` is :func:`hard_loss`).

    Head ``i``'s logits at position ``t`` (``head_logits [K, B, T, V]``) are trained towards the target's
    distribution at ``t + i + 1`` (``target_logits [B, T, V]``) by cross-entropy (KL(target || head) plus the
    target's entropy: the same gradient), over the tokens the head can express. With ``ids [Vd]`` (the heads'
    draft vocabulary; the heads are ``-inf`` elsewhere) it runs over those columns only: the same value, with the
    teacher's probabilities gathered once for all heads.
    """
    total, per_head = head_logits.new_zeros(()), []
    seq = target_logits.shape[1]
    teach_p = F.softmax(target_logits, dim=-1)[..., ids] if ids is not None else None  # [B, T, Vd]
    for i in range(head_logits.shape[0]):
        n = seq - i - 1  # positions t with a teacher at t + i + 1 inside the window
        if n <= 0:
            break
        if teach_p is not None:
            logq = F.log_softmax(head_logits[i, :, :n, ids], dim=-1)  # [B, n, Vd]
            loss = -(teach_p[:, i + 1 :] * logq).sum(-1).mean()
        else:
            loss = soft_cross_entropy(target_logits[:, i + 1 :], F.log_softmax(head_logits[i, :, :n], dim=-1))
        total = total + decay**i * loss
        per_head.append(loss.detach())
    return total, per_head


def hard_loss(heads: MedusaHeads, hidden: torch.Tensor, labels: torch.Tensor, decay: float):
    """``loss=hard`` from the target's argmax ``labels [B, T]`` on ``hidden [B, T, H]``: ``(weighted loss,
    each head's loss)``: cross-entropy on the target's argmax, head ``i`` at ``t`` against the label at ``t + i + 1``.

    Heads with a draft vocabulary are scored over its ``Vd`` columns only (no ``[K, B, T, V]`` logits, whose
    softmax and scatter cost more than the heads themselves); labels outside it are skipped.
    """
    total, per_head = hidden.new_zeros(()), []
    seq = labels.shape[1]
    for i, head in enumerate(heads.heads):
        n = seq - i - 1  # positions t with a label at t + i + 1 inside the window
        if n <= 0:
            break
        x = head.blocks(hidden[:, :n])  # [B, n, H]
        lab = labels[:, i + 1 :]  # [B, n]
        if heads.draft_vocab:
            logits, lab = head.lm_head.scores(x), head.lm_head.columns(lab)  # [B, n, Vd], [B, n]
        else:
            logits = head.lm_head(x)  # [B, n, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
        total = total + decay**i * loss
        per_head.append(loss.detach())
    return total, per_head


@torch.no_grad()
def evaluate(heads: MedusaHeads, target, chunks: torch.Tensor, batch_size: int = 8, ranks: int = RANKS,
             start: int = 0) -> dict:
    """Held-out accuracy of each head against the target's own greedy predictions.

    For head ``i`` at position ``t >= start`` the label is the target's argmax at ``t + i + 1``. Reports top-1,
    top-5, the share of positions where the label is the head's rank-``r`` token (``rank_accuracy``,
    r < ``ranks``), and two baselines: always predicting the most frequent label (``majority_top1``)
    and the target's own next-token prediction at ``t`` (``next_token_top1``, what an untrained head does).
    """
    heads.eval()
    k, vocab = heads.num_heads, heads.vocab_size
    on = {"dtype": torch.float64, "device": chunks.device}  # the counts live where the batches are (CUDA too)
    hits = torch.zeros(k, ranks, **on)
    top5 = torch.zeros(k, **on)
    base_next = torch.zeros(k, **on)
    label_counts = torch.zeros(k, vocab, **on)
    positions = torch.zeros(k, **on)
    for row in range(0, chunks.shape[0], batch_size):
        batch = chunks[row : row + batch_size]
        hidden, t_logits = teacher(target, batch)  # [B, T, H], [B, T, V]
        greedy = t_logits.argmax(-1)  # [B, T]
        logits = heads(hidden[:, start:].to(next(heads.parameters()).dtype)).float()  # [K, B, T - start, V]
        for i in range(k):
            n = batch.shape[1] - start - i - 1  # positions t = start .. T - i - 2
            lab = greedy[:, start + i + 1 :]  # [B, n]
            z = logits[i, :, :n]  # [B, n, V]
            rank = (z > z.gather(-1, lab[..., None])).sum(-1)  # [B, n] how many tokens score above the label
            hits[i] += torch.stack([(rank == r).sum() for r in range(ranks)]).double()
            top5[i] += (rank < 5).sum()
            base_next[i] += (greedy[:, start : start + n] == lab).sum()
            label_counts[i] += torch.bincount(lab.reshape(-1), minlength=vocab).double()
            positions[i] += lab.numel()
    acc = hits / positions[:, None]  # [K, R]
    per_head = [{"head": i + 1, "depth": i + 1, "top1": float(acc[i, 0]), "top5": float(top5[i] / positions[i]),
                 "majority_top1": float(label_counts[i].max() / positions[i]),
                 "next_token_top1": float(base_next[i] / positions[i]), "positions": int(positions[i])}
                for i in range(k)]
    return {"per_head": per_head, "rank_accuracy": acc.tolist(), "chance_top1": 1.0 / vocab,
            "heldout_tokens": int(chunks.numel())}


class MedusaRecipe(HeadRecipe):
    """Medusa heads for :func:`experiments.head_training.train` (``conf/train_medusa.yaml``'s knobs)."""

    name = "medusa"
    resume_keys = ("num_heads", "num_blocks", "loss", "head_decay")
    files = FILES

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.teacher = MemoTeacher() if cfg.get("memo_features") else None

    def check(self, cfg: DictConfig) -> None:
        if cfg.loss not in LOSSES:
            raise ConfigError(f"loss={cfg.loss!r}: use one of {LOSSES}")
        if not isinstance(cfg.num_heads, int) or isinstance(cfg.num_heads, bool) or cfg.num_heads < 1:
            raise ConfigError(f"num_heads={cfg.num_heads!r}: it must be an integer >= 1")
        if not 0 < float(cfg.head_decay) <= 1:
            raise ConfigError(f"head_decay={cfg.head_decay} must be in (0, 1]")
        if cfg.get("memo_features") and cfg.loss != "hard":
            raise ConfigError("memo_features=true keeps the target's argmax only: use it with loss=hard")

    def check_target(self, cfg: DictConfig, target) -> None:
        if cfg.get("init_from"):  # heads for another model or of another shape: before minutes of generated rows
            start_from(str(cfg.init_from), target, cfg)

    def build(self, cfg: DictConfig, target, draft_vocab: torch.Tensor | None = None) -> MedusaHeads:
        device = target.get_output_embeddings().weight.device
        if cfg.get("init_from"):  # warm start: trained heads for this target, their draft vocabulary with them
            return start_from(str(cfg.init_from), target, cfg).to(device)
        return MedusaHeads.for_target(target, cfg.num_heads, cfg.num_blocks, draft_vocab=draft_vocab).to(device)

    def loss(self, head: MedusaHeads, target, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.cfg.loss == "hard":
            hidden, labels = self.teacher(target, batch) if self.teacher else argmax_teacher(target, batch)
            loss, per_head = hard_loss(head, hidden, labels, self.cfg.head_decay)  # labels [B, T]
        else:
            hidden, t_logits = teacher(target, batch)  # [B, T, H], [B, T, V]
            ids = head.heads[0].lm_head.ids if head.draft_vocab else None  # [Vd]: one draft vocabulary for all heads
            loss, per_head = medusa_loss(head(hidden), t_logits, self.cfg.head_decay, ids)
        return loss, {f"train/loss_head{i + 1}": float(x) for i, x in enumerate(per_head)}

    def evaluate(self, head: MedusaHeads, target, eval_chunks: torch.Tensor, cfg: DictConfig) -> dict:
        report = evaluate(head, target, eval_chunks, cfg.eval_batch_size)
        if cfg.eval_generated_rows:  # the decode regime: held-out prompts continued greedily by the target
            rows = generate_rows(target, eval_chunks.cpu(), cfg.eval_generated_rows, cfg.generated_prompt, 0.0,
                                 cfg.seed)
            report["generated"] = evaluate(head, target, rows.to(eval_chunks.device), cfg.eval_batch_size,
                                           start=cfg.generated_prompt)
        return {**report, "loss": cfg.loss}

    def final_metrics(self, report: dict) -> dict:
        final = {f"eval/head{h['head']}_{m}": h[m] for h in report["per_head"] for m in ("top1", "top5")}
        return final | {f"eval_generated/head{h['head']}_{m}": h[m]
                        for h in report.get("generated", {}).get("per_head", []) for m in ("top1", "top5")}

    def out_dir(self, cfg: DictConfig, fingerprint: dict) -> Path:
        """``<cache>/medusa/zoo-<size>`` (zoo) or ``<cache>/medusa/<name>-<fingerprint>``."""
        if not cfg.target:
            return default_heads_dir(cfg.zoo_size, cfg.cache_dir)
        return default_heads_dir("x", cfg.cache_dir).parent / target_dir_name(cfg, fingerprint)

    def save(self, head: MedusaHeads, out_dir: Path, training: dict, report: dict) -> None:
        save_heads(head.cpu(), out_dir, training=training, evaluation=report)

    def load(self, out_dir: Path) -> MedusaHeads:
        return load_heads(out_dir)


def start_from(directory: str, target, cfg: DictConfig) -> MedusaHeads:
    """Trained heads to continue from (``init_from``): they must be for ``target``, with ``cfg``'s shape."""
    try:
        heads = load_heads(directory)
        check_target(heads, target, fix="point init_from at heads trained for this target, or drop it")
    except MedusaHeadsError as exc:
        raise ConfigError(f"init_from={directory}: {exc}") from None
    shape = {"num_heads": heads.num_heads, "num_blocks": heads.num_blocks, "draft_vocab": heads.draft_vocab}
    wanted = {"num_heads": cfg.num_heads, "num_blocks": cfg.num_blocks, "draft_vocab": int(cfg.get("draft_vocab") or 0)}
    if shape != wanted:
        raise ConfigError(f"init_from={directory}: those heads have {shape}, this run asks for {wanted}; set them "
                          "alike or drop init_from")
    return heads.float()

