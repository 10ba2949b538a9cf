"""Decode a prompt set with a drafter and with the autoregressive baseline; report and log the metrics.

Run ``python -m experiments.decode`` (defaults in ``conf/config.yaml``), e.g.::

    python -m experiments.decode experiment=smoke
    python -m experiments.decode model=hf model.target=/path/to/target model.draft=/path/to/draft
    python -m experiments.decode -m drafter.num_speculative_tokens=1,2,4,8

Each run writes ``records.jsonl`` and ``summary.json`` in its Hydra run directory as it goes,
then logs to the configured logger (W&B offline by default). A run whose directory already holds
complete results of the same config is skipped, an interrupted one continues (``resume``,
:mod:`experiments.resume`); forward costs are measured once per model and device for the predicted
speedup (``costs``, :mod:`experiments.costs`). Sweep presets: ``sweep=draft_length|temperature|
drafters|tree_shape|custom``; report: ``python -m experiments.report <sweep dir>``. Input errors (bad paths, unknown
names, bad values) print ``error: <message>`` and exit with status 2.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments import cli, resume, schema  # noqa: F401  (registers base_config and ${safe_dirname:})
from experiments.costs import cost_model_scope
from experiments.decode_costs import add_cost_model, auto_widths, measure_run_costs, padded_costs, set_cheap_widths
from experiments.decoding import EncodedPrompt, decode_continuous, decode_group, groups
from experiments.drafter_config import build_drafter, check_before_loading, check_drafter_files, tree_argument
from experiments.greedy_check import rounding_check
from experiments.instantiate import accepts_argument, check_arguments, instantiate
from experiments.loggers import GuardedLogger, Logger, check_logger_node
from experiments.machine_load import LoadWatch
from experiments.models_from_config import LoadedModels, check_dtypes, load_models, target_device
from experiments.pretrained_heads import pretrained_heads
from experiments.results import (
    BASELINE,
    RECORDS_FILE,
    SPECULATIVE,
    SUMMARY_FILE,
    MethodResults,
    ResultsWriter,
    build_summary,
    format_table,
    lossless_warnings,
    read_records,
    results_from_records,
)
from experiments.runs import job_label
from specdec.errors import ConfigError
from specdec.static_shape import check_compile
from verifier.verifier import check_widths

log = logging.getLogger(__name__)

#: ``batch_mode``: ``static`` decodes the prompts in consecutive groups of ``batch_size``; ``continuous``
#: keeps at most ``batch_size`` rows at once and gives a finished row's place to the next prompt.
BATCH_MODES = ("static", "continuous")


# --------------------------------------------------------------------------- building blocks


def load_dataset_prompts(dataset: DictConfig, num_prompts: int) -> tuple[list, int | None]:
    """``(prompts, max_prompt_tokens)``: the first ``num_prompts`` prompts of the prompt set the ``dataset``
    config's ``_target_`` builds (:mod:`experiments.datasets`), and how many prompt tokens to keep."""
    prompt_set = instantiate(dataset, "dataset")
    prompts = prompt_set.load(num_prompts)
    if num_prompts is not None and len(prompts) < num_prompts:  # as dataset=stdlib's own check says
        raise ConfigError(f"num_prompts={num_prompts} but the prompt set holds only {len(prompts)} prompts; ask for "
                          f"num_prompts<={len(prompts)}")
    return prompts, prompt_set.max_prompt_tokens


def encode_prompts(prompts: list, tokenizer: Any, max_prompt_tokens: int | None, device: Any) -> list[EncodedPrompt]:
    """Tokenize each prompt with the target's tokenizer, keeping the last ``max_prompt_tokens`` tokens."""
    from experiments.data import prompt_ids

    encoded = []
    for prompt in prompts:
        ids = prompt_ids(prompt, tokenizer)  # [1, T]
        if max_prompt_tokens is not None:
            ids = ids[:, -max_prompt_tokens:]  # [1, min(T, n)]
        if ids.shape[1] == 0:
            raise ConfigError(f"prompt {prompt.question_id!r} is empty after tokenization")
        encoded.append(EncodedPrompt(prompt.question_id, prompt.category, ids.to(device)))
    if any(p.messages is not None for p in prompts) and not getattr(tokenizer, "chat_template", None):
        print("warning: the target's tokenizer has no chat template: the prompt set's chats are given to it as "
              "'role: content' lines ending in 'assistant:', which a model not trained on chats may not answer (a "
              "chat set measures a chat target, e.g. model=smollm2)", file=sys.stderr)
    return encoded


def check_prompts(decoder: Any, encoded: list[EncodedPrompt], max_new_tokens: int) -> None:
    """Every prompt and ``max_new_tokens`` fit the target's context and the drafter's own, checked before anything
    is measured or decoded; a :class:`ConfigError` naming the first prompt that does not."""
    from specdec.errors import SpecDecError

    for prompt in encoded:
        try:
            decoder.check_inputs(prompt.input_ids, max_new_tokens)
        except SpecDecError as err:
            raise ConfigError(f"prompt {prompt.question_id!r}: {err}") from None


def build_acceptance(acceptance: DictConfig, sampling: Any) -> Any:
    """The acceptance rule the config's ``_target_`` builds, checked against ``sampling`` before any decoding."""
    from specdec.acceptance import AcceptanceRule, check_signature

    check_arguments(acceptance, "acceptance")
    rule = instantiate(acceptance, "acceptance")
    if not isinstance(rule, AcceptanceRule):
        raise ConfigError(f"acceptance: _target_ {acceptance.get('_target_')!r} is not an AcceptanceRule "
                          "(subclass specdec.acceptance.AcceptanceRule)")
    check_signature(rule)
    rule.check(sampling)
    return rule


def build_logger(logger_cfg: DictConfig, run_dir: Path, group: str | None, run_name: str | None) -> Logger:
    """Instantiate the configured logger, passing the run directory and, in a sweep, the group and run name."""
    kwargs: dict = {"run_dir": str(run_dir)}
    if group and not logger_cfg.get("group") and accepts_argument(logger_cfg, "group", "logger"):
        kwargs["group"] = group
    if run_name and accepts_argument(logger_cfg, "run_name", "logger"):
        kwargs["run_name"] = run_name
    return instantiate(logger_cfg, "logger", **kwargs)


def make_decoders(cfg: DictConfig, models: LoadedModels, drafter: Any, rule: Any, sampling: Any) -> dict:
    """``{method: (decoder, drafter name)}``: the speculative decoder and, if ``cfg.baseline``, the
    autoregressive one (same target, sampling and attention backend; its one-token forwards are never padded to
    ``verify_widths``: it is plain decoding, the speedup's reference)."""
    from drafters import NoDrafter
    from specdec import SpeculativeDecoder

    def make(d: Any, acceptance: Any, widths: Any = None) -> Any:
        return SpeculativeDecoder(target=models.target, drafter=d, acceptance=acceptance, sampling=sampling,
                                  attn_backend=cfg.attn_backend, compile=cfg.compile, verify_widths=widths)

    widths = None if auto_widths(cfg) else cfg.get("verify_widths")
    decoders = {SPECULATIVE: (make(drafter, rule, widths), type(drafter).__name__)}
    if cfg.baseline:
        # With no drafts, greedy (temperature 0) and rejection (otherwise) are plain decoding from the target.
        decoders[BASELINE] = (make(NoDrafter(), "greedy" if sampling.greedy else "rejection"), "NoDrafter")
    return decoders


# --------------------------------------------------------------------------- the run


def run(cfg: DictConfig, run_dir: str | Path, logger: Logger | None = None, hydra_info: dict | None = None) -> dict:
    """Decode ``cfg.num_prompts`` prompts with every method, write local results, log; return the summary.

    Args:
        cfg: the composed decode config (schema: :class:`experiments.schema.DecodeConfig`).
        run_dir: where ``records.jsonl``, ``summary.json`` (and the logger's files) go.
        logger: a logger to use instead of instantiating ``cfg.logger`` (tests).
        hydra_info: ``group`` / ``run_name`` for the logger (set by :func:`main` in a sweep).
    """
    from specdec import SamplingParams
    from specdec.batch_decoder import batch_rule
    from verifier.availability import check_attn_backend

    run_dir, hydra_info = Path(run_dir), hydra_info or {}
    from specdec.models import check_device, set_threads

    set_threads(cfg.num_threads, "num_threads")
    if cfg.model.get("device_map") is None:  # an absent GPU fails before anything loads
        check_device(target_device(cfg.model), "model.device")
    if cfg.warmup < 0:
        raise ConfigError(f"warmup={cfg.warmup}: give the number of warm-up decodes, >= 0")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: decode at least one prompt at a time (batch_size >= 1)")
    if cfg.batch_mode not in BATCH_MODES:
        raise ConfigError(f"batch_mode={cfg.batch_mode!r} is unknown; choose one of {list(BATCH_MODES)}")
    check_compile(cfg.compile)
    if cfg.compile == "graph" and target_device(cfg.model).split(":")[0] != "cuda":  # the API's eager fallback
        raise ConfigError(f"compile=graph captures the step in a CUDA graph: it needs model.device=cuda (got "
                          f"{target_device(cfg.model)}); on a CPU, compile=static runs the same fixed-shape step "
                          "eagerly and compile=inductor compiles it")
    if cfg.batch_mode == "continuous" and cfg.compile != "none":
        raise ConfigError(f"batch_mode=continuous needs compile=none (got compile={cfg.compile}): the fixed-shape "
                          "step keeps one set of rows; use batch_mode=static with it")
    check_before_loading(cfg)
    check_dtypes(cfg.model)
    for group in ("drafter", "logger"):  # a wrong _target_ or a misspelled argument in their own files too
        check_arguments(cfg[group], group)
    check_logger_node(cfg.logger)
    tree_argument(cfg.drafter, cfg.get("tree"))  # a tree file of the wrong shape fails before any model loads too
    for line in pretrained_heads(cfg):  # heads=null with model=smollm2: the heads trained for it, not the zoo's
        print(line, file=sys.stderr)
    check_drafter_files(cfg.drafter)  # so do a missing draft checkpoint or heads directory (a hybrid's part's too)
    sampling = SamplingParams(**OmegaConf.to_container(cfg.sampling))
    rule = build_acceptance(cfg.acceptance, sampling)
    if cfg.batch_size > 1 or cfg.compile != "none":
        batch_rule(rule)  # a rule with no batched form (which the fixed-shape step needs too) fails before any load
    check_attn_backend(cfg.attn_backend, target_device(cfg.model))
    if not auto_widths(cfg):  # a bad width list fails before any model loads too
        check_widths(cfg.get("verify_widths"))
    if cfg.get("verify_widths") and (cfg.batch_size > 1 or cfg.compile != "none"):
        print(f"warning: verify_widths pads the batch-1 eager loop's verifies only; ignored with batch_size="
              f"{cfg.batch_size}, compile={cfg.compile}", file=sys.stderr)
    prompts, max_prompt_tokens = load_dataset_prompts(cfg.dataset, cfg.num_prompts)
    if cfg.batch_size > len(prompts) > 0:  # the records and the report give the batches' real size
        print(f"warning: batch_size={cfg.batch_size} but {len(prompts)} prompt(s): each batch holds "
              f"{len(prompts)} rows (num_prompts={cfg.batch_size} or more fills them)", file=sys.stderr)
    config = OmegaConf.to_container(cfg, resolve=True)
    methods = [SPECULATIVE, BASELINE] if cfg.baseline else [SPECULATIVE]
    previous = resume.prepare(run_dir, config, methods, [p.question_id for p in prompts], resume=cfg.resume)
    for message in previous.messages:
        print(message, file=sys.stderr)
    if previous.complete is not None:
        show_results(previous.complete, run_dir)  # a rerun showed only "skipping ..."
        return backfill_logger(cfg, run_dir, previous.complete, logger, hydra_info)
    model_cfg, pinned = resume.pinned_model(cfg.model, previous)
    drafter_cfg, pinned_head = resume.pinned_drafter(cfg.drafter, previous)
    for line in (pinned, pinned_head):
        if line:
            print(line, file=sys.stderr)
    models = load_models(model_cfg)
    encoded = encode_prompts(prompts, models.tokenizer, max_prompt_tokens, _device_of(models.target))
    drafter = build_drafter(drafter_cfg, models, cfg.get("tree"))
    if cfg.batch_size > 1:
        drafter.batched()  # a drafter with no batched form fails here, before any measuring
    decoders = make_decoders(cfg, models, drafter, rule, sampling)
    check_prompts(decoders[SPECULATIVE][0], encoded, cfg.max_new_tokens)
    step_shape = drafter.step_shape(models.target)
    scope = cost_model_scope(cfg.batch_size, cfg.compile)  # not None: the cost model does not price this run
    costs = None if scope else measure_run_costs(cfg, step_shape, models, encoded)
    shape = step_shape.describe(type(drafter).__name__)
    if auto_widths(cfg) and not scope:  # else ignored (warned above)
        set_cheap_widths(decoders[SPECULATIVE][0], costs)
    costs = padded_costs(costs, decoders[SPECULATIVE][0])

    writer = ResultsWriter(run_dir, keep=previous.records)
    log.info("decoding %d prompts with %s (+ baseline: %s); results in %s",
             len(encoded), type(drafter).__name__, cfg.baseline, run_dir)
    if logger is None:
        logger = build_logger(cfg.logger, run_dir, hydra_info.get("group"), hydra_info.get("run_name"))
    guarded = GuardedLogger(logger, run_dir)
    extra = {"run_dir": str(run_dir), "drafter": type(drafter).__name__, "drafter_shape": shape, "acceptance": rule.name,
             "lossless": rule.lossless, "models": models.info, "config": config,
             "question_ids": [p.question_id for p in encoded], "resumed_prompts": len(previous.done),
             "overrides": hydra_info.get("overrides")}  # None from Python (the report falls back to .hydra's)
    restored = results_from_records(previous.records)
    results = {name: restored.get(name, MethodResults()) for name in decoders}

    def summarize(status: str) -> dict:
        summary = build_summary(results, greedy=sampling.greedy, status=status, num_prompts=len(encoded), extra=extra)
        return add_cost_model(summary, results[SPECULATIVE], costs, shape, scope)

    status = "running"
    try:
        writer.write_summary(summarize("running"))
        guarded.log_config(config)
        guarded.log_resumed(previous.records, extra["question_ids"])
        if warmed := warm_up(decoders, encoded, cfg):
            extra["warmup_time_compile"] = warmed
        pending = [(i, p) for i, p in enumerate(encoded) if p.question_id not in previous.done]  # resumed: the rest
        watch = LoadWatch.start_now()
        bar = tqdm(total=len(pending), desc="decoding", unit="prompt", file=sys.stderr)

        def emit(index: int, record: dict) -> None:
            writer.add_record(record)
            guarded.log_prompt(index, record)

        first = max(max(r.batches, default=-1) + 1 for r in results.values())  # ids go on after a resumed run's
        if cfg.batch_mode == "continuous":
            for method, (decoder, drafter_name) in decoders.items():
                def emit_and_count(index: int, record: dict, method=method) -> None:
                    emit(index, record)
                    bar.update(method == SPECULATIVE)
                decode_continuous(decoder, pending, method, drafter_name, cfg.max_new_tokens, cfg.seed,
                                  models.tokenizer, results[method], cfg.batch_size, first, emit_and_count)
                writer.write_summary(summarize("running"))
        else:
            for batch_id, group in enumerate(groups(pending, cfg.batch_size)):
                for method, (decoder, drafter_name) in decoders.items():
                    records = decode_group(decoder, group, method, drafter_name, cfg.max_new_tokens, cfg.seed,
                                           models.tokenizer, results[method],
                                           first + batch_id if cfg.batch_size > 1 else None)
                    for (index, _), record in zip(group, records):
                        emit(index, record)
                writer.write_summary(summarize("running"))
                bar.update(len(group))
        bar.close()
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as exc:
        status = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        summary = summarize(status)
        if status == "complete" and sampling.greedy:  # a bf16 target parts from its baseline at near-ties only
            summary["metrics"].update(rounding_check(models.target, {p.question_id: p.input_ids for p in encoded},
                                                     results[SPECULATIVE].outputs, summary.get("mismatched_question_ids")))
            summary["warnings"] = summary.get("warnings", []) + lossless_warnings(summary)
        if status == "complete":  # a busy machine's timings are flagged
            machine = watch.summary()
            summary["warnings"] = summary.get("warnings", []) + machine.pop("warnings")
            summary.update(machine)
        writer.write_summary(summary)
        writer.close()
        if status == "complete":
            guarded.log_summary(summary)
        guarded.finish()
    show_results(summary, run_dir)
    return summary


def show_results(summary: dict, run_dir: Path) -> None:
    """Print a run's table, warnings and result files from its ``summary`` (a finished run's, or a skipped complete
    run's as the run printed them); a summary of an older layout is named, not printed."""
    try:
        table = format_table(summary)
    except (KeyError, TypeError, ValueError, AttributeError):
        table = f"(the earlier summary's layout is older than this version's table: see {run_dir / SUMMARY_FILE})"
    print(table)
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"results: {run_dir / RECORDS_FILE} and {run_dir / SUMMARY_FILE}")


def backfill_logger(cfg: DictConfig, run_dir: Path, summary: dict, logger: Logger | None, hydra_info: dict) -> dict:
    """A complete run that is skipped: if its logger never received the summary (the process was killed
    between ``summary.json`` and the logger), log it now from the local records. Returns ``summary``."""
    if logger is None:
        logger = build_logger(cfg.logger, run_dir, hydra_info.get("group"), hydra_info.get("run_name"))
    records = read_records(run_dir / RECORDS_FILE)[0] if (run_dir / RECORDS_FILE).exists() else []
    guarded = GuardedLogger(logger, run_dir)
    if guarded.backfill(summary, records):
        print(f"{guarded.name}: logged the summary of {run_dir} from its local records (it had not been logged)",
              file=sys.stderr)
    return summary


def warm_up(decoders: dict, encoded: list[EncodedPrompt], cfg: DictConfig) -> dict[str, float]:
    """``cfg.warmup`` untimed generations per method: of the first prompt, or with ``batch_size > 1`` one
    batch of the first prompts (the batched path's first calls are not the batch-1 loop's). Returns the seconds
    each method spent in them compiling or capturing its step (``compile != none``; where it did)."""
    first = [p.input_ids for p in encoded[: cfg.batch_size]]
    compiled = dict.fromkeys(decoders, 0.0)
    for _ in range(cfg.warmup):
        for method, (decoder, _) in decoders.items():
            if cfg.batch_size > 1:
                out = decoder.generate_batch(first, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
            else:
                out = decoder.generate(first[0], max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
            compiled[method] += out.stats.time_compile
    return {method: seconds for method, seconds in compiled.items() if seconds}


def _device_of(model: Any) -> Any:
    return getattr(model, "device", "cpu")


# --------------------------------------------------------------------------- Hydra entry point


def _hydra_info() -> dict:
    """Run directory, the command line's overrides (the summary keeps them: a later command that fails its checks
    in the same directory rewrites ``.hydra/overrides.yaml``), the W&B group (``<parent>/<name>`` of the sweep's
    directory, or of a single run's: ``experiments.report <dir>`` logs to the same one) and for a multirun the run
    name (its overrides, short: :func:`experiments.runs.job_label`)."""
    from hydra.core.hydra_config import HydraConfig

    from experiments.overrides import in_multirun

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    info = {"run_dir": hc.runtime.output_dir, "group": f"{run_dir.parent.name}/{run_dir.name}", "run_name": None,
            "overrides": list(hc.overrides.task)}
    if in_multirun():
        sweep_dir = Path(hc.sweep.dir)
        info["group"] = f"{sweep_dir.parent.name}/{sweep_dir.name}"
        info["run_name"] = job_label(list(hc.overrides.task), list(hc.job.config.override_dirname.exclude_keys))
    return info


@cli.hydra_main("config", interrupted=resume.interrupted_note)
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors follow :mod:`experiments.cli` (``error: <message>``, exit status 2)."""
    info = _hydra_info()
    with resume.claim_run_dir(info["run_dir"]):  # a second identical command waits, then skips or resumes
        run(cfg, info["run_dir"], hydra_info=info)


if __name__ == "__main__":
    main()
