"""LoRA through PEFT (learner.lora, docs/lora.md): adapters on a policy, the plain weights that
engines, checkpoints and exports see, and the checks of learner.lora.target_modules.

The adapters are injected into the policy module itself (PEFT replaces each target nn.Linear by a
LoRA layer holding the frozen base layer and A, B). So the module the learner and the embedded
transformers engine call is still the Hugging Face model, and every forward pass, selected-token
compute and packing included, runs through the adapters without knowing of them.

Engines get merged weights under the base model's names (W + B A * alpha / rank per target
layer): they hold a plain model. Learner, rollout and the export command use this module, so it
sits outside learner/ and rollout/ (docs/extending.md#layers). peft is imported only when a
recipe asks for LoRA.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from efficient_rl.config.schema import LoraSection
from efficient_rl.errors import ConfigError

ADAPTER_DIR = "adapter"  # in a LoRA run's checkpoint: PEFT's adapter_config.json and adapter_model.safetensors
ADAPTER_NAME = "default"  # PEFT's name for a model's one adapter
FIELD = "learner.lora.target_modules"


# ---------------------------------------------------------------- checks at load
def linear_layer_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target. The output head is left out: most small
    models tie it to the input embedding, and the selected-token compute calls it on its own."""
    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def check_target_modules(model, targets: list[str]) -> None:
    valid = linear_layer_names(model)
    if not targets:
        raise ConfigError(
            f"{FIELD}: expected a non-empty list of linear layer names; the model has: {', '.join(valid)}"
        )
    unknown = [name for name in targets if name not in valid]
    if unknown:
        raise ConfigError(
            f"{FIELD}: {', '.join(map(repr, unknown))} not a linear layer of the model; valid names: {', '.join(valid)}"
        )


def check_lora_targets(config, lora: LoraSection) -> None:
    """The check at recipe load, from the model's config alone: its skeleton on the meta device
    (no memory, no weights read), so that every backend fails before it starts anything."""
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("peft") is None:
        raise ConfigError("learner.lora: needs the peft package: pip install -e '.[lora]'")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_target_modules(skeleton, lora.target_modules)


# ---------------------------------------------------------------- adapters
def policy_weights_dir(recipe, model_dir: Path, base_model_dir: Path) -> Path:
    """Where the policy's own weights load from: a LoRA policy's are the base model's whatever
    checkpoint it resumes (a checkpoint's model.safetensors is merged; its adapter/ goes on top)."""
    return base_model_dir if recipe.learner.lora is not None else model_dir


def attach_lora(model, lora: LoraSection, checkpoint: Path | None = None, seed: int = 0):
    """Inject adapters into `model` in place (its base weights frozen) and return the PeftModel
    around it (for disable_adapter and the adapter's files). A resumed run's adapter weights come
    from `checkpoint`/adapter when there is one."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, lora.target_modules)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    # A starts random (B at zero): drawn from `seed`, so that a run (and every data-parallel rank)
    # starts from the same adapter, whatever the process drew before; the global RNG is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = get_peft_model(model, config)
    if checkpoint is not None and (Path(checkpoint) / ADAPTER_DIR).is_dir():
        load_adapter(adapter, Path(checkpoint) / ADAPTER_DIR)
    return adapter


def save_adapter(adapter, directory: Path) -> None:
    # In a subdirectory: transformers reads an adapter_config.json next to config.json as "load the
    # base model, then this adapter", while the checkpoint's own weights are merged already.
    adapter.save_pretrained(Path(directory) / ADAPTER_DIR)


def load_adapter(adapter, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(adapter, load_file(Path(directory) / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise ConfigError(f"{directory}: adapter weights the model has no place for: {result.unexpected_keys[:3]}")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """What the optimizer steps: every parameter, or with LoRA only the adapters' (PEFT froze the rest)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


# ---------------------------------------------------------------- plain weights
@dataclass(frozen=True)
class PlainWeight:
    """One parameter of the plain model under its base name, and what it is computed from."""

    name: str
    sources: tuple[torch.nn.Parameter, ...]  # the base parameter first: what ZeRO-3 must gather
    merge: Callable[[], torch.Tensor] | None = None  # W + B A * scale, for a LoRA layer's weight

    @property
    def base(self) -> torch.nn.Parameter:
        return self.sources[0]

    def value(self) -> torch.Tensor:
        return self.merge() if self.merge is not None else self.base


def lora_layers(model) -> dict[str, object]:
    """Module name -> PEFT LoRA layer; none without peft installed (no model has adapters then)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def merged_weight(layer) -> torch.Tensor:
    # PEFT's own delta: B @ A * scaling, transposed for fan_in_fan_out layers
    return layer.base_layer.weight + layer.get_delta_weight(ADAPTER_NAME)


def plain_weights(model) -> list[PlainWeight]:
    """The model's parameters as the model without adapters names them (tied ones once). Without
    adapters these are the parameters themselves; with them, each target layer's weight merged."""
    layers = lora_layers(model)
    weights = []
    for name, parameter in model.named_parameters():
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner not in layers:
            if not any(f".{part}." in name for part in ("lora_A", "lora_B")):
                weights.append(PlainWeight(name, (parameter,)))
        elif leaf == "weight":
            layer = layers[owner]
            weights.append(
                PlainWeight(
                    f"{owner}.weight",
                    (parameter, layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight),
                    merge=lambda layer=layer: merged_weight(layer),
                )
            )
        else:  # the base layer's bias: unchanged
            weights.append(PlainWeight(f"{owner}.{leaf}", (parameter,)))
    return weights


def plain_named_weights(model) -> list[tuple[str, torch.Tensor]]:
    return [(weight.name, weight.value()) for weight in plain_weights(model)]
