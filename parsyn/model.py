"""Loading a causal LM: the embedded default model, a Hugging Face folder, or a `.gguf` file.

GGUF files are dequantized by transformers on every load (about 20 s for the default model), so the
first load converts them once into a safetensors folder in the user cache; later loads take ~2 s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from . import cpu, registry
from .files import atomic_folder, locked
from .registry import cache_dir

log = logging.getLogger("parsyn")


@dataclass(frozen=True, eq=False)
class LM:
    """A loaded model with its tokenizer. `name` identifies the weights (used by checkpoints)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def config(self):
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def windows(self) -> dict[str | None, int | None]:
        """Attention window per layer type (None: full attention); key None when all layers share one mask."""
        return attention_windows(self.config)

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * self.dtype.itemsize

    def check_memory(self, rows: int, tokens: int) -> None:
        """ValueError when `rows` sequences of `tokens` each (K/V plus last-token logits) won't fit in free memory."""
        need = rows * (tokens * self.kv_bytes_per_token + 4 * self.config.vocab_size)
        free = free_memory(self.device)
        if need > 0.8 * free:
            raise ValueError(
                f"{rows} sequences of {tokens} tokens need about {need / 2**30:.1f} GiB of KV cache; "
                f"only {free / 2**30:.1f} GiB of memory is free"
            )

    def check_positions(self, last: int, what: str) -> None:
        """ValueError when positions up to `last` (exclusive) exceed the model's maximum."""
        if last > self.max_positions:
            raise ValueError(f"{what} needs {last} positions; the model has {self.max_positions}")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a turn: the tokenizer's EOS plus the generation config's."""
        ids = {self.tokenizer.eos_token_id}
        extra = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        return tuple(sorted(i for i in ids if i is not None))

    @cached_property
    def fingerprint(self) -> str:
        """What K/V computed by this model depends on: config, tokenizer, dtype and (a strided sample of)
        every weight. Two loads of the same weights in the same dtype agree; another model does not."""
        h = hashlib.sha256(json.dumps(identity(self), sort_keys=True).encode() + str(self.dtype).encode())
        for name, p in sorted(self.model.named_parameters()):
            if "lora_" in name:
                continue
            h.update(name.replace(".base_layer", "").encode() + str(tuple(p.shape)).encode())
            flat = p.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def pad_id(self) -> int:
        """The token placed in padding slots (masked, so its value never reaches a real row)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.stop_ids[0]


def identity(lm: LM) -> dict:
    """Name plus hashes of the model config and the tokenizer: what a trained synthesizer must match."""
    settings = lm.model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                     "_attn_implementation_autoset", "quantization_config", "use_cache"):
        settings.pop(volatile, None)
    tok = lm.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items())) + json.dumps(tok.all_special_tokens) + str(tok.chat_template)
    return {
        "name": lm.name,
        "config_hash": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "tokenizer_hash": hashlib.sha256(vocab.encode()).hexdigest()[:16],
    }


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def attention_windows(config) -> dict[str | None, int | None]:
    """Sliding window per layer type; a single entry keyed None for models that take one mask tensor."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {None: window}
    return {t: (window if "sliding" in t else None) for t in sorted(set(layer_types))}


def rotary_module(model: PreTrainedModel) -> torch.nn.Module:
    """The model's rotary embedding module; ValueError for models without rotary positions."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"model type '{kind}' has no rotary position embeddings; parsyn re-encodes RoPE keys and needs a "
            "RoPE model (Llama, Qwen, Mistral, Gemma 3, ...)"
        )
    return rotary


def tokenizer(name: str = "smollm2-135m") -> PreTrainedTokenizerBase:
    """A named embedded model's tokenizer (converting the model once if needed)."""
    return AutoTokenizer.from_pretrained(_converted(registry.gguf(name)))


def check_device(device: str) -> torch.device:
    """The torch device named `device`; ValueError when it is not a device or not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"'{device}' is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' is not available here (no CUDA GPU)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device '{device}' is not supported (cpu or cuda)")
    return dev


def load(
    path: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> LM:
    """Load a causal LM for parsyn.

    path: a named embedded model (`parsyn models` lists them), None for the default one
    (Qwen2.5-Coder-0.5B-Instruct unless $PARSYN_MODEL names another), a Hugging Face model folder, or a
    `.gguf` file.
    dtype defaults to float32 on CPU (faster than bf16 there) and bfloat16 on GPUs.
    """
    check_device(device)
    path = registry.default() if path is None else path
    if str(path) in registry.MODELS:
        folder, name = _converted(registry.gguf(str(path))), registry.named(str(path)).title
    else:
        path = Path(path).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            folder, name = _converted(path), path.stem
        elif path.is_dir() and (path / "config.json").is_file():
            folder, name = path, path.resolve().name
        elif path.exists():
            raise ValueError(f"not a Hugging Face model folder (no config.json) or a .gguf file: {path}")
        else:
            raise ValueError(f"model not found: {path} is no file or folder, nor a model name "
                             f"({', '.join(registry.MODELS)})")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return wrap(model.to(device), AutoTokenizer.from_pretrained(folder), name)


def wrap(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, *, pack: bool = True) -> LM:
    """An LM from a model already in memory: frozen, in eval mode, on CPU with `cpu.ATTENTION` in place of
    SDPA and (fp32, `pack`) with oneDNN-packed linear layers, which make batched decoding much faster on
    some CPUs. These are set once here; nothing changes the model afterwards."""
    rotary_module(model)
    model.eval().requires_grad_(False)
    if next(model.parameters()).device.type == "cpu":
        if model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(cpu.ATTENTION)
        if pack and cpu.available():
            cpu.pack_linears_(model)
    return LM(model=model, tokenizer=tokenizer, name=name)


def _fingerprint(path: Path) -> str:
    """Size plus the first and last MiB: cheap, and changes when the file does."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def conversion_of(gguf: Path) -> Path:
    """Where the safetensors folder converted from `gguf` lies (or will lie) in the cache."""
    return cache_dir() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"


def _converted(gguf: Path) -> Path:
    """The safetensors folder converted from `gguf`, made once (atomically) in the cache."""
    out = conversion_of(gguf)
    if (out / "config.json").is_file():
        return out
    with locked(out.with_name(f".{out.name}.converting")):
        if (out / "config.json").is_file():  # another process converted it while this one waited
            return out
        log.info("converting %s to safetensors once (about 30 s) into %s", gguf.name, out)
        with atomic_folder(out) as tmp:
            try:
                _convert(gguf, tmp)
            except (ValueError, KeyError, IndexError, OSError, RuntimeError, struct.error) as error:
                detail = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ValueError(f"cannot read {gguf} as a GGUF model ({detail}); the file may be truncated or "
                                 "corrupt: get it again") from None
    return out


def _convert(gguf: Path, out: Path) -> None:
    # transformers refuses save_pretrained on GGUF-loaded models, so rebuild a plain model from the
    # config and move the dequantized fp32 weights into it (fp32 keeps logits identical to the GGUF load).
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = source.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict())
    plain.generation_config = source.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
