"""The shape of the package: the inference path stays free of training code, modules and functions stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "parsyn"

# Fork and synthesize on a tiny model through the public API, then list what got imported. (Accelerate is
# not checked: transformers imports it whenever it is installed.)
PROGRAM = """
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
import parsyn
from parsyn.model import wrap
vocab = {f"t{i}": i for i in range(64)}
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t2")
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, eos_token_id=2)
lm = wrap(AutoModelForCausalLM.from_config(config), tok, "tiny")
f = parsyn.from_texts(lm, "t5 t6", ["t7 t8", "t9"])
parsyn.synthesize(lm, f, route="cache", sampling=parsyn.SamplingParams(3))
parsyn.adapter.resolve(lm, "auto")
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] == "peft" or
                      m.startswith(("parsyn.train", "parsyn.eval", "parsyn.cli")))))
"""


def test_the_inference_path_never_imports_training_code():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"imported on the inference path: {done.stdout}"


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_400_lines():
    long = {p.relative_to(PACKAGE).as_posix(): n for p in sources() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_function_over_60_lines():
    long = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long[f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} {node.name}"] = lines
    assert not long, long
