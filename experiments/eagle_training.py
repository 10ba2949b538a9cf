"""EAGLE heads' training objective, held-out evaluation and recipe (a library for ``experiments.train_eagle``).

Both versions run the head *unrolled* (:func:`unroll`): step 0 reads the target's features with the
text's next tokens (slot ``s``: ``(f_s, t_{s+1})``, causal over slots); step ``j`` feeds each slot
its own step ``j - 1`` output as the feature, with token ``t_{s+j+1}``, at position ``s + j``, and
sees step 0's slots up to ``s`` plus its own earlier steps at ``s``: exactly what a chain draft of
depth ``j + 1`` rooted at ``t_{s+1}`` sees during decoding (EAGLE-3's "training-time test").

- eagle2 (EAGLE-1/2): one step by default; loss = smooth-L1 between the output and the target's
  next feature + ``ce_weight`` (0.1) x cross-entropy against the target's next-token distribution,
  with uniform noise on the input features.
- eagle3: ``ttt_steps`` unrolled steps, loss = sum over steps of ``ttt_decay ** j`` x cross-entropy.

Evaluation measures, per depth d = 1..``eval_depth``, on held-out corpus text and on held-out
prompts continued by the target itself (greedily, and sampled at T = 1): how often the head's
depth-d draft equals the target's greedy token (``greedy``), and the expected acceptance
``sum_x min(p(x), q(x))`` of a draft sampled from the head (``sampled``), each per depth
(``match_by_depth``), chained over depths 1..d (``accept_rate_by_depth``: what a chain's
acceptance by depth reports) and conditional on depth d - 1 (``alpha_by_depth``). On the greedy
continuations the chained greedy figure is exactly what greedy chain decoding would accept.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from drafters.draft_vocab import DraftVocabHead, expressible, soft_cross_entropy
from drafters.eagle_heads import FILES, VERSIONS, EagleHead, default_heads_dir, load_head, save_head
from experiments.head_data import generate_rows
from experiments.head_teachers import teacher
from experiments.head_training import HeadRecipe, target_dir_name
from specdec.errors import ConfigError
from specdec.models import text_config
from verifier.verifier import attention_backend, cache_argument

#: Per-version defaults of the settings left null in ``conf/train_eagle.yaml``.
VERSION_DEFAULTS = {
    "eagle2": {"ttt_steps": 1, "ce_weight": 0.1, "regression_weight": 1.0, "feature_noise": 0.2},
    "eagle3": {"ttt_steps": 3, "ce_weight": 1.0, "regression_weight": 0.0, "feature_noise": 0.0},
}


def options(cfg: DictConfig) -> dict:
    """The loss settings with the version's defaults filled in (validated)."""
    if cfg.version not in VERSIONS:
        raise ConfigError(f"version={cfg.version!r} is unknown; choose one of {list(VERSIONS)}")
    opts = {k: (cfg[k] if cfg[k] is not None else v) for k, v in VERSION_DEFAULTS[cfg.version].items()}
    opts["ttt_decay"] = float(cfg.ttt_decay)
    opts["ce_target"] = cfg.ce_target
    if cfg.ce_target not in ("soft", "hard"):
        raise ConfigError(f"ce_target={cfg.ce_target!r}: use 'soft' (the target's distribution) or 'hard' (its argmax)")
    for key in ("ttt_steps", "eval_depth"):
        value = opts.get(key, cfg[key])
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value!r}: it must be an integer >= 1")
    for key in ("ce_weight", "regression_weight", "feature_noise"):
        if float(opts[key]) < 0:
            raise ConfigError(f"{key}={opts[key]}: it must be >= 0")
    if not 0 < opts["ttt_decay"] <= 1:
        raise ConfigError(f"ttt_decay={cfg.ttt_decay} must be in (0, 1]")
    return opts


# --------------------------------------------------------------------------- the unrolled head


def ttt_mask(n: int, step: int, device) -> torch.Tensor:
    """``[1, 1, n, n * (step + 1)]`` bool: slot s sees step 0's slots <= s and its own slot in steps 1..step."""
    s = torch.arange(n, device=device)[:, None]  # [n, 1]
    k = torch.arange(n * (step + 1), device=device)[None]  # [1, S]
    block, offset = k // n, k % n
    return (((block == 0) & (offset <= s)) | ((block > 0) & (offset == s)))[None, None]


def unroll(head: EagleHead, features: torch.Tensor, batch: torch.Tensor, steps: int) -> list[tuple]:
    """Run ``head`` for ``steps`` unrolled steps over ``batch [B, T]`` with step-0 features ``[B, T - 1, H]``.

    Returns per step ``(logits [B, T - 1, V], output features [B, T - 1, H])``; at step j slot s drafts
    the token at position ``s + j + 2`` (valid for ``s < T - 1 - j``; later slots are padding).
    """
    from transformers import DynamicCache

    b, t = batch.shape
    n = t - 1
    pos = torch.arange(n, device=batch.device)  # [n]
    cache = DynamicCache()
    outs = []
    with attention_backend(head.model, "sdpa"):
        for j in range(steps):
            ids = batch[:, (pos + j + 1).clamp(max=t - 1)]  # [B, n]
            mask = ttt_mask(n, j, batch.device) if j else None  # step 0: causal
            logits, hidden = head(ids, features, position_ids=(pos + j)[None].expand(b, n), use_cache=True,
                                  specdec_prefix_len=n * j, specdec_tree_mask=None, specdec_key_mask=mask,
                                  **{cache_argument(type(head.model)): cache})  # [B, n, V], [B, n, H]
            outs.append((logits, hidden))
            features = hidden
    return outs


def teacher_features(target, tap, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen target on ``batch [B, T]``: the head's raw features ``[B, T, H or 3H]`` (eagle3: the
    hooked layers), its logits ``[B, T, V]`` and last hidden state ``[B, T, H]`` (float32)."""
    hidden, logits = teacher(target, batch)
    raw = tap.take().float() if tap is not None else hidden
    return raw, logits, hidden


def eagle_loss(head: EagleHead, raw: torch.Tensor, t_logits: torch.Tensor, t_hidden: torch.Tensor,
               batch: torch.Tensor, opts: dict) -> tuple[torch.Tensor, dict]:
    """The weighted loss over unrolled steps and per-step metrics (cross-entropy, regression, top-1)."""
    features = head.target_features(raw[:, :-1])  # [B, n, H]
    if opts["feature_noise"]:
        features = features + (torch.rand_like(features) - 0.5) * opts["feature_noise"]
    n = batch.shape[1] - 1
    ids = draft_ids(head) if opts["ce_target"] == "soft" else None  # [Vd] or None
    # a draft vocabulary: the teacher's probabilities at its ids once per batch, not a full softmax per step
    teach_p = F.softmax(t_logits, dim=-1)[..., ids] if ids is not None else None  # [B, T, Vd]
    t_top = t_logits.argmax(-1)  # [B, T]: the target's greedy token, once for every step
    total, metrics = features.new_zeros(()), {}
    for j, (logits, out) in enumerate(unroll(head, features, batch, opts["ttt_steps"])):
        m = n - j  # slots with a label
        teach, top = t_logits[:, j + 1 : j + 1 + m], t_top[:, j + 1 : j + 1 + m]  # [B, m, V], [B, m]
        if ids is not None:  # the same cross-entropy over the draft columns only (the head is -inf elsewhere)
            logq = F.log_softmax(logits[:, :m, ids].float(), dim=-1)  # [B, m, Vd]
            ce = -(teach_p[:, j + 1 : j + 1 + m] * logq).sum(-1).mean()
            drafted = ids[logq.argmax(-1)]  # [B, m]
        else:
            logq = F.log_softmax(logits[:, :m].float(), dim=-1)  # [B, m, V]
            drafted = logq.argmax(-1)  # [B, m]
            if opts["ce_target"] == "hard":  # the target's argmax: what greedy decoding accepts
                labels = expressible(logq, top)  # [B, m] (a draft vocabulary cannot express some)
                ce = F.nll_loss(logq.reshape(-1, logq.shape[-1]), labels.reshape(-1))
            else:  # its whole distribution
                ce = soft_cross_entropy(teach, logq)
        loss = opts["ce_weight"] * ce
        if opts["regression_weight"]:
            reg = F.smooth_l1_loss(out[:, :m].float(), t_hidden[:, j + 1 : j + 1 + m])
            loss = loss + opts["regression_weight"] * reg
            metrics[f"train/regression_step{j + 1}"] = float(reg.detach())
        total = total + opts["ttt_decay"] ** j * loss
        metrics[f"train/ce_step{j + 1}"] = float(ce.detach())
        metrics[f"train/top1_step{j + 1}"] = float((drafted == top).float().mean())
    return total, metrics


def draft_ids(head: EagleHead) -> torch.Tensor | None:
    """The ids ``[Vd]`` the head's LM head scores (a draft vocabulary), or None for the whole vocabulary."""
    lm_head = head.model.lm_head
    return lm_head.ids if isinstance(lm_head, DraftVocabHead) else None


# --------------------------------------------------------------------------- held-out acceptance by depth


class DepthStats:
    """Sums of greedy matches and expected sampled acceptance by depth, alone and chained over depths."""

    def __init__(self, depth: int):
        self.sums = {k: torch.zeros(depth, dtype=torch.float64) for k in ("gm", "gc", "sm", "sc")}
        self.positions = 0

    def add(self, draft_logits: list[torch.Tensor], t_logits: torch.Tensor, start: int) -> None:
        """``draft_logits[j] [B, m, V]``: the depth-(j + 1) drafts of slots ``start .. start + m - 1``,
        against the target's ``t_logits [B, T, V]`` at positions ``start + j + 1 ...``."""
        b, m = draft_logits[0].shape[:2]
        chain_g = torch.ones(b, m, dtype=torch.float64, device=t_logits.device)
        chain_s = chain_g.clone()
        for j, z in enumerate(draft_logits):
            teach = t_logits[:, start + j + 1 : start + j + 1 + m]  # [B, m, V]
            match = (z.argmax(-1) == teach.argmax(-1)).double()  # [B, m]
            accept = torch.minimum(F.softmax(teach, -1), F.softmax(z.float(), -1)).sum(-1).double()  # [B, m]
            chain_g, chain_s = chain_g * match, chain_s * accept
            for key, value in (("gm", match), ("gc", chain_g), ("sm", accept), ("sc", chain_s)):
                self.sums[key][j] += float(value.sum())
        self.positions += b * m

    def report(self) -> dict:
        def part(single: str, chained: str) -> dict:
            rate = (self.sums[chained] / max(1, self.positions)).tolist()
            alpha = [rate[0]] + [rate[d] / rate[d - 1] if rate[d - 1] > 0 else 0.0 for d in range(1, len(rate))]
            return {"match_by_depth": (self.sums[single] / max(1, self.positions)).tolist(),
                    "accept_rate_by_depth": rate, "alpha_by_depth": alpha}
        return {"positions": self.positions, "greedy": part("gm", "gc"), "sampled": part("sm", "sc")}


@torch.no_grad()
def evaluate(head: EagleHead, target, tap, rows: torch.Tensor, depth: int, batch_size: int = 8, start: int = 0,
             draft=None) -> dict:
    """Acceptance by depth of the head's chain drafts on ``rows [R, T]`` (slots ``start`` to ``T - 1 - depth``),
    teacher-forced on the rows' tokens; with ``draft`` (a causal LM), the same for its chain drafts."""
    head.eval()
    mine, theirs = DepthStats(depth), DepthStats(depth) if draft is not None else None
    n = rows.shape[1] - 1
    stop = n - depth + 1  # slots whose depth-`depth` draft has a label
    if stop <= start:
        raise ConfigError(f"eval rows of {rows.shape[1]} tokens are too short for eval_depth={depth} after {start} "
                          "tokens: lower eval_depth or raise context")
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i : i + batch_size]
        raw, t_logits, _ = teacher_features(target, tap, batch)
        outs = unroll(head, head.target_features(raw[:, :-1]), batch, depth)
        mine.add([z[:, start:stop] for z, _ in outs], t_logits, start)
        if draft is not None:
            d_logits = draft(input_ids=batch).logits.float()  # [B, T, V]: the chain's depth-(j+1) draft of slot s
            theirs.add([d_logits[:, start + j + 1 : stop + j + 1] for j in range(depth)], t_logits, start)
    return {"head": mine.report(), **({"draft_model": theirs.report()} if theirs is not None else {})}


# --------------------------------------------------------------------------- the recipe


class EagleRecipe(HeadRecipe):
    """EAGLE heads for :func:`experiments.head_training.train` (``conf/train_eagle.yaml``'s knobs)."""

    name = "eagle"
    resume_keys = ("version", "init", "ttt_steps", "ttt_decay", "ce_target", "ce_weight", "regression_weight", "feature_noise",
                   "feature_layers")
    betas = (0.9, 0.95)  # EAGLE's
    files = FILES

    def __init__(self, cfg: DictConfig):
        self.cfg, self.opts, self.tap = cfg, None, None

    def check(self, cfg: DictConfig) -> None:
        self.opts = options(cfg)

    def build(self, cfg: DictConfig, target, draft_vocab: torch.Tensor | None = None) -> EagleHead:
        layers = list(cfg.feature_layers) if cfg.feature_layers is not None else None
        depth = int(text_config(target).num_hidden_layers)
        if layers is not None and (bad := [i for i in layers if not 0 <= int(i) < depth]):
            raise ConfigError(f"feature_layers={layers}: {bad} outside the target's layers 0..{depth - 1}; pick three "
                              f"of them (low, middle, high), or null for the default")
        head = EagleHead.for_target(target, cfg.version, layers, seed=cfg.seed, init=cfg.init, draft_vocab=draft_vocab)
        self.tap = head.tap(target)
        return head

    def loss(self, head: EagleHead, target, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raw, t_logits, t_hidden = teacher_features(target, self.tap, batch)
        return eagle_loss(head, raw, t_logits, t_hidden, batch, self.opts)

    def evaluate(self, head: EagleHead, target, eval_chunks: torch.Tensor, cfg: DictConfig) -> dict:
        depth, size, draft = int(cfg.eval_depth), cfg.eval_batch_size, self._draft(cfg, target)
        report = {"version": cfg.version, "depth": depth, "options": dict(self.opts),
                  "feature_layers": head.feature_layers,
                  "heldout_text": evaluate(head, target, self.tap, eval_chunks, depth, size, draft=draft)}
        for name, temperature in (("greedy_continuations", 0.0), ("sampled_continuations", 1.0)):
            if cfg.eval_generated_rows:  # held-out prompts continued by the target: the decode regimes
                rows = generate_rows(target, eval_chunks.cpu(), cfg.eval_generated_rows, cfg.generated_prompt,
                                     temperature, cfg.seed)
                report[name] = evaluate(head, target, self.tap, rows.to(eval_chunks.device), depth, size,
                                        start=cfg.generated_prompt, draft=draft)
        report["alpha_depth1"] = report["heldout_text"]["head"]["greedy"]["match_by_depth"][0]
        return report

    def _draft(self, cfg: DictConfig, target):
        """The embedded pair's draft model (for side-by-side figures) when training on the zoo target."""
        if cfg.target or not cfg.eval_draft:
            return None
        from experiments.zoo import ensure_pair
        from specdec.models import load_causal_lm

        pair = ensure_pair(size=cfg.zoo_size, cache_dir=cfg.cache_dir)
        device = target.get_output_embeddings().weight.device
        return load_causal_lm(pair.draft_dir, dtype="float32", device=str(device), role="draft")

    def final_metrics(self, report: dict) -> dict:
        final = {}
        for part in ("heldout_text", "greedy_continuations", "sampled_continuations"):
            for kind in ("greedy", "sampled"):
                for d, value in enumerate(report.get(part, {}).get("head", {}).get(kind, {}).get("accept_rate_by_depth",
                                                                                                  [])):
                    final[f"eval_{part}/{kind}_accept_depth{d + 1}"] = value
        return final

    def out_dir(self, cfg: DictConfig, fingerprint: dict) -> Path:
        """``<cache>/eagle/<version>-zoo-<size>`` (zoo) or ``<cache>/eagle/<version>-<name>-<fingerprint>``."""
        if not cfg.target:
            return default_heads_dir(cfg.version, cfg.zoo_size, cfg.cache_dir)
        return default_heads_dir(cfg.version, "x", cfg.cache_dir).parent / f"{cfg.version}-{target_dir_name(cfg, fingerprint)}"

    def load(self, out_dir: Path) -> EagleHead:
        return load_head(out_dir)

    def save(self, head: EagleHead, out_dir: Path, training: dict, report: dict) -> None:
        save_head(head, out_dir, training={**training, "options": self.opts}, evaluation=report)
        if self.tap is not None:
            self.tap.remove()
