"""parsyn's own LoRA layer: PEFT's arithmetic, active only where and in the thread where it is asked for."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import tiny_lm
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from parsyn.lora import LoRA, LoRALinear, detach

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def randomized(lora: LoRA, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def pair(tokenizer):
    """The same tiny model twice: one with PEFT's LoRA (the pinned release), one with parsyn's."""
    base = tiny_lm("llama", tokenizer).model
    theirs = copy.deepcopy(base)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), bias="none"), theirs)
    mine = LoRA(base, TARGETS, rank=4, alpha=8)
    randomized(mine)
    state = {k: v.clone() for k, v in mine.state_dict().items()}
    assert set(state) == set(get_peft_model_state_dict(theirs))  # the same tensor names: checkpoints carry over
    set_peft_model_state_dict(theirs, state)
    return base, mine, theirs


def test_active_lora_is_pefts_lora_and_inactive_is_the_base_model(pair, tokenizer):
    base, mine, theirs = pair
    ids = torch.randint(3, 40000, (2, 9), generator=torch.Generator().manual_seed(1))
    plain = logits(tiny_lm("llama", tokenizer).model, ids)
    torch.testing.assert_close(logits(base, ids), plain, atol=0, rtol=0)  # attached but not active
    with mine.active():  # (inference runs the merged weights: equal up to the rounding of W + s·BA)
        torch.testing.assert_close(logits(base, ids), logits(theirs, ids), atol=2e-5, rtol=1e-5)
    assert (logits(theirs, ids) - plain).abs().max() > 1e-3  # the update matters


def test_inference_runs_a_merged_copy_exact_to_the_low_rank_path_and_rebuilt_when_weights_change(pair):
    base, mine, _ = pair
    ids = torch.randint(3, 40000, (2, 9), generator=torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with mine.active():
        merged = logits(base, ids)
        with torch.enable_grad():  # trainable weights under autograd: the low-rank path
            low_rank = base(input_ids=ids).logits.detach()
    torch.testing.assert_close(merged, low_rank, atol=2e-5, rtol=1e-5)
    assert torch.equal(merged.argmax(-1), low_rank.argmax(-1))
    layer = next(iter(mine.layers.values()))
    assert layer._merge and layer._merge[0].weight is not layer.base_layer.weight
    after = base.state_dict()  # the copy is no parameter, and the base weights are untouched
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
    randomized(mine, seed=5)  # weights changed in place (a training step, a load): the copy follows
    with mine.active():
        again = logits(base, ids)
        with torch.enable_grad():
            torch.testing.assert_close(again, base(input_ids=ids).logits.detach(), atol=2e-5, rtol=1e-5)
    assert (again - merged).abs().max() > 1e-3


def test_rows_mask_applies_the_lora_to_some_rows_only(pair):
    base, mine, _ = pair
    ids = torch.randint(3, 40000, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = logits(base, ids)
    with mine.active():
        adapted = logits(base, ids)
    with mine.active(rows=torch.tensor([True, False])):
        mixed = logits(base, ids)
    torch.testing.assert_close(mixed[0], adapted[0], atol=2e-5, rtol=1e-5)  # low-rank path vs merged weights
    torch.testing.assert_close(mixed[1], plain[1], atol=1e-6, rtol=0)


def test_activation_is_private_to_its_thread(pair):
    base, mine, _ = pair
    ids = torch.randint(3, 40000, (1, 7), generator=torch.Generator().manual_seed(3))
    plain = logits(base, ids)
    seen = {}
    with mine.active():
        worker = threading.Thread(target=lambda: seen.update(other=logits(base, ids)))
        worker.start()
        worker.join()
        seen["here"] = logits(base, ids)
    torch.testing.assert_close(seen["other"], plain, atol=0, rtol=0)
    assert (seen["here"] - plain).abs().max() > 1e-3


def test_detach_restores_the_base_layers_and_a_second_lora_needs_it(pair, tokenizer):
    base, mine, _ = pair
    with pytest.raises(ValueError, match="already holds a LoRA"):
        LoRA(base, TARGETS, rank=2, alpha=4)
    assert detach(base) == 2 * len(TARGETS)
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    ids = torch.randint(3, 40000, (1, 5), generator=torch.Generator().manual_seed(4))
    with mine.active():  # its layers are gone from the model: nothing applies
        torch.testing.assert_close(logits(base, ids), logits(tiny_lm("llama", tokenizer).model, ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no linear layer"):
        LoRA(base, ("nothing_proj",), rank=2, alpha=4)


def test_a_packed_cpu_linear_stays_packed_when_merged(tokenizer):
    from parsyn.cpu import PackedLinear

    model = tiny_lm("qwen2", tokenizer, pack=True).model
    lora = LoRA(model, TARGETS, rank=2, alpha=4)
    randomized(lora)
    ids = torch.randint(3, 40000, (1, 6), generator=torch.Generator().manual_seed(6))
    with lora.active():
        merged = logits(model, ids)  # built inside inference mode, still a tensor whose version is tracked
        with torch.enable_grad():
            torch.testing.assert_close(merged, model(input_ids=ids).logits.detach(), atol=2e-5, rtol=1e-5)
    assert all(isinstance(layer._merge[0], PackedLinear) for layer in lora.layers.values())
