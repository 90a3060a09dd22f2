"""A LoRA training step does the work the naive rebuild does, no more: the frozen CLIP tower runs without autograd
(nothing of it is recorded or saved for backward), whatever asks the input embeddings for gradients."""

import pytest
import torch
from conftest import IMAGE_SIZE
from peft import get_peft_model

from loracaptioner import LoraCaptionerForConditionalGeneration
from loracaptioner.lora import decoder_lora_config, quiet_peft


def lora_model(model, checkpointing: bool = False):
    """peft's own recipe: with activation checkpointing on, `get_peft_model` calls `enable_input_require_grads`,
    which transformers 5 spreads to every sub-model's input embeddings, CLIP's patch embedding included."""
    if checkpointing:
        model.activation_checkpointing_enable()
    with quiet_peft():
        peft_model = get_peft_model(model, decoder_lora_config(model, r=4, alpha=8, dropout=0.0))
    return peft_model.train()


def batch(size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "labels": torch.randint(2, 20, (size, 5), generator=generator)}


def tower_output_grad_fns(peft_model, inputs: dict) -> list:
    """Run a training forward and backward; the `grad_fn` of every output of the CLIP tower and of its projection."""
    encoder = peft_model.get_base_model().encoder
    grad_fns = []
    hooks = [module.register_forward_hook(lambda _, __, output: grad_fns.append(
        (output if isinstance(output, torch.Tensor) else output.last_hidden_state).grad_fn))
        for module in (encoder.vision_tower, encoder.visual_projection)]
    peft_model(**inputs).loss.backward()
    for hook in hooks:
        hook.remove()
    return grad_fns


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_tower_builds_no_autograd_graph_in_a_lora_training_step(model, checkpointing):
    peft_model = lora_model(model, checkpointing)
    assert tower_output_grad_fns(peft_model, batch()) == [None, None]
    # ... while everything that trains still gets its gradient (the bridge and the decoder's adapters).
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".bridge." in name for name in trainable) and any("lora_B" in name for name in trainable)
    assert all(p.grad is not None for p in trainable.values())


def test_input_embedding_grads_save_no_tower_activations(model):
    """`enable_input_require_grads` (peft with checkpointing, the Trainer with adapters) costs nothing in the tower:
    no tensor is saved for backward while the tower runs (at full size they would be ~half of a step's)."""
    peft_model = lora_model(model)
    peft_model.get_base_model().enable_input_require_grads()
    tower, inside, saved_in_tower = peft_model.get_base_model().encoder.vision_tower, [], []
    tower.register_forward_pre_hook(lambda *_: inside.append(True))
    tower.register_forward_hook(lambda *_: inside.clear())

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if inside:
            saved_in_tower.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = peft_model(**batch()).loss
    assert loss.requires_grad and saved_in_tower == []


def test_gradients_reach_pixels_through_a_frozen_tower_when_asked(model):
    """Saliency and adversarial uses: `pixel_values.requires_grad` still records the tower, which stays untrained."""
    inputs = batch()
    inputs["pixel_values"].requires_grad_(True)
    model(**inputs).loss.backward()
    assert inputs["pixel_values"].grad is not None and inputs["pixel_values"].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.vision_tower.parameters())


def test_an_unfrozen_tower_trains(backbones):
    model = LoraCaptionerForConditionalGeneration.from_backbones(*backbones, freeze_vision=False).train()
    model(**batch()).loss.backward()
    assert all(p.grad is not None for p in model.encoder.vision_tower.parameters())
    assert model.encoder.visual_projection.weight.grad is not None
