"""parsyn: synthesize parallel LLM-agent branches from their KV caches.

    lm = parsyn.load()                                   # the default model (parsyn models lists them)
    f = parsyn.fork(lm, "Why is the sky blue?", workers=3)
    s = parsyn.synthesize(lm, f, route="cache", layout="parallel")
    trained = parsyn.adapter.resolve(lm, "auto")         # the packaged synthesizer when it fits lm
    s, decision = parsyn.auto.synthesize_auto(lm, f, parsyn.auto.Gate.load("gate.json"))
"""

from . import adapter, auto
from .kv import KV
from .model import LM, load
from .sampling import SamplingParams
from .synthesis import Synthesis, stream, synthesize
from .workers import Branch, Fork, fork, fork_many, from_texts

__all__ = ["KV", "LM", "Branch", "Fork", "SamplingParams", "Synthesis", "adapter", "auto", "fork", "fork_many",
           "from_texts", "load", "stream", "synthesize"]
