"""Shared fixtures: the embedded model (truth) and tiny random models of several families (breadth)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from parsyn import model as M

torch.set_num_threads(2)
# The fast tests run on SmolLM2-135M, here and in the command lines they start; the tests of the default
# model (Qwen2.5-Coder-0.5B) name it.
os.environ["PARSYN_MODEL"] = "smollm2-135m"

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3")


@pytest.fixture(scope="session")
def default_lm() -> M.LM:
    return M.load("smollm2-135m")


@pytest.fixture(scope="session")
def qwen() -> M.LM:
    """The default model, Qwen2.5-Coder-0.5B-Instruct, for the tests that need a model that can answer."""
    return M.load("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def tokenizer(default_lm):
    return default_lm.tokenizer


def tiny_config(family: str, *, rope: dict | None = None, window: int = 24):
    """Two layers, small widths; attention windows short enough that tests cross them."""
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    rope = rope or {"rope_type": "default", "rope_theta": 10000.0}
    if family == "llama":
        return LlamaConfig(**common, rope_parameters=rope)
    if family == "qwen2":
        return Qwen2Config(**common, rope_parameters=rope)
    if family == "qwen3":
        return Qwen3Config(**common, rope_parameters=rope)
    if family == "mistral":
        return MistralConfig(**common, rope_parameters=rope, sliding_window=window)
    if family == "phi3":
        common.pop("head_dim")
        return Phi3Config(**common, rope_parameters={**rope, "partial_rotary_factor": 0.5})
    if family == "gemma3":
        return Gemma3TextConfig(
            **common, sliding_window=window, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": rope | {"rope_theta": 1e6} if rope.get("rope_type") == "default" else rope,
            },
        )
    raise ValueError(family)


def tiny_lm(family: str, tokenizer, *, rope: dict | None = None, seed: int = 0, pack: bool = False) -> M.LM:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, rope=rope), dtype=torch.float32,
                                             attn_implementation="sdpa")
    return M.wrap(model, tokenizer, f"tiny-{family}", pack=pack)


def random_synthesizer(lm: M.LM, config, std: float = 0.05):
    """A synthesizer attached to `lm` with random weights (away from the identity, so it changes answers)."""
    from parsyn import adapter as A

    trained = A.attach(lm, config)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0, std)
    return trained


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a Hugging Face folder, for command lines that take --model."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_lm("llama", tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
