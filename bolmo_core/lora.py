"""LoRA adapters on the global blocks for Stage 2 (`StageConfig.lora`), through PEFT.

Stage 2 normally trains the whole global model (the source's transformer blocks) end to end.
With `stage2.lora` set, PEFT's LoRA layers wrap the chosen Linear layers of the global blocks
(``target_modules``, suffixes such as ``q_proj``): the base weights stay frozen and only the
low-rank factors train (W x + alpha/rank * B A x), while the local encoder, boundary predictor,
decoder and head train fully as before. What it saves is the global model's gradients and its
AdamW moments (two fp32 copies of every global weight); activations are unchanged, since
gradients still flow through the global blocks to the local encoder.

Checkpoints store the adapters UNMERGED (each wrapped layer's ``base_layer.weight`` plus its
``lora_A``/``lora_B``): those are the optimizer's actual variables, so resuming is exact.
Loading a checkpoint of such a stage (`bolmo_core.load.load_checkpoint_model`) injects the
same adapters, loads the tensors and merges them with PEFT's ``merge_and_unload``
(W <- W + alpha/rank * B A), so evaluation, generation and the HF export see the plain
architecture: the exported folder is the same as after a full Stage 2.
"""

from __future__ import annotations

from .config import LoraConfig

ADAPTER_NAME = "default"
_TUNER = "_lora_tuner"  # the PEFT LoraModel, kept outside the module tree (not a registered submodule)


class LoraError(ValueError):
    """A LoRA setting that does not fit the model, with a one-line reason."""


def is_adapter_param(name: str) -> bool:
    """A LoRA factor (trained) rather than a wrapped base weight (frozen)."""
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(model) -> bool:
    return _TUNER in model.global_model.__dict__


def add_adapters(model, cfg: LoraConfig) -> int:
    """Wrap `model`'s global blocks' target layers with LoRA (in place); the number of adapter parameters.

    The adapters' initial values (A random, B zero: the model's output is unchanged) come from
    the torch RNG, so a seeded run gets the same adapters on every rank.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import LoraModel

    if has_adapters(model):
        raise LoraError("the global model already has LoRA adapters")
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    base = model.global_model.model
    try:
        tuner = LoraModel(base, peft_cfg, ADAPTER_NAME)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model ..."
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if type(m).__name__ == "Linear"}
        )
        raise LoraError(
            f"stage2.lora.target_modules={list(cfg.target_modules)}: {str(e).splitlines()[0][:120]} "
            f"(Linear layers in the global blocks: {', '.join(names)})"
        ) from None
    model.global_model.__dict__[_TUNER] = tuner
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))


def merge_adapters(model) -> None:
    """Fold every adapter into its base weight and remove the LoRA layers (PEFT's merge_and_unload)."""
    tuner = model.global_model.__dict__.pop(_TUNER, None)
    if tuner is None:
        raise LoraError("the global model has no LoRA adapters to merge")
    model.global_model.model = tuner.merge_and_unload()
    if hasattr(model.global_model.model, "peft_config"):
        del model.global_model.model.peft_config


def stage_lora(preset, stage: int) -> LoraConfig | None:
    """The LoRA setting a checkpoint of `stage` of `preset` was trained with (Stage 1 never has one)."""
    return preset.stage2.lora if stage == 2 else None
