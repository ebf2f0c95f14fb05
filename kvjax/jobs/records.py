"""A batch job's input lines, output records, and the output file it resumes from.

Input (JSONL), one object a line (blank lines are skipped):

    {"id": "a1", "prompt": "..."}                                   one prompt, compressed whole
    {"id": "a2", "context": "...", "questions": ["...", "..."]}     a context compressed once, then each
                                                                    question answered from it
    an optional "meta" value is copied into the line's records

Output (JSONL), one record per (id, question, policy):

    {"id", "question": index (null for a prompt line), "policy": {"name", "options"}, "text",
     "prompt_tokens", "generated_tokens", "cache_bytes", "live_tokens", "prefill_s", "decode_s", "batch",
     "compiled", "job", "line"[, "meta"]}

(cache_bytes: this sequence's share of its batch's pooled cache; live_tokens: token slots it holds,
summed over layers and KV heads; timings and `batch`: its batch's, see kvjax.jobs.runner)
or an error record {"id", "line", "error"[, "question", "policy"], "job"}: without "policy" the line
itself is bad (not JSON, a missing field, too long for the model), with it one policy failed on it.
The key of a record is (id, question, policy label); a line error's key is its line number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from kvjax.errors import InputError

INPUT_KEYS = ("id", "prompt", "context", "questions", "meta")


@dataclasses.dataclass(frozen=True)
class Item:
    """One good input line: a prompt (`questions` empty) or a context with its questions."""

    line: int
    id: Any
    text: str
    questions: tuple[str, ...] = ()
    meta: Any = None

    @property
    def is_context(self) -> bool:
        return bool(self.questions)

    @property
    def question_indices(self) -> tuple[int | None, ...]:
        return tuple(range(len(self.questions))) if self.questions else (None,)


@dataclasses.dataclass(frozen=True)
class LineError:
    line: int
    id: Any
    error: str


def _nonempty_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def parse_line(number: int, text: str) -> Item | LineError:
    """One input line (1-based `number`) -> an Item, or a LineError saying what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return LineError(number, None, f"line {number} is not JSON: {e.msg} (column {e.colno})")
    if not isinstance(obj, dict):
        return LineError(number, None, f"line {number} must be a JSON object, got {type(obj).__name__}")
    ident = obj.get("id")
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        return LineError(number, None, f"line {number}: id must be a string or an int, got {ident!r}")
    unknown = sorted(k for k in obj if k not in INPUT_KEYS)
    if unknown:
        return LineError(number, ident, f"line {number}: unknown key(s) {unknown}; allowed: {list(INPUT_KEYS)}")
    if ("prompt" in obj) == ("context" in obj):
        return LineError(number, ident, f"line {number}: exactly one of 'prompt' or 'context' (with 'questions')")
    if "prompt" in obj:
        if "questions" in obj:
            return LineError(number, ident, f"line {number}: 'questions' go with 'context', not with 'prompt'")
        if not _nonempty_text(obj["prompt"]):
            return LineError(number, ident, f"line {number}: prompt must be a non-empty string, "
                             f"got {_short(obj['prompt'])}")
        return Item(number, ident, obj["prompt"], (), obj.get("meta"))
    questions = obj.get("questions")
    if not _nonempty_text(obj["context"]):
        return LineError(number, ident, f"line {number}: context must be a non-empty string, "
                         f"got {_short(obj['context'])}")
    if not isinstance(questions, list) or not questions or not all(_nonempty_text(q) for q in questions):
        return LineError(number, ident, f"line {number}: questions must be a non-empty list of non-empty strings, "
                         f"got {_short(questions)}")
    return Item(number, ident, obj["context"], tuple(questions), obj.get("meta"))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_input(path) -> list[Item | LineError]:
    """Every non-blank line of the input, parsed; a repeated id is an error on its later line."""
    out: list[Item | LineError] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            parsed = parse_line(number, text)
            if isinstance(parsed, Item):
                key = json.dumps(parsed.id)
                if key in seen:
                    parsed = LineError(number, parsed.id, f"line {number}: id {parsed.id!r} repeats line {seen[key]}")
                else:
                    seen[key] = number
            out.append(parsed)
    return out


def record_key(ident, question, policy_label: str) -> tuple[str, Any, str]:
    return (json.dumps(ident), question, policy_label)


def _policy_label(policy: dict) -> str:
    return json.dumps(policy, sort_keys=True, default=str)


@dataclasses.dataclass
class Done:
    """What an output file already holds: record keys, line-error lines, and a dropped partial line."""

    keys: set = dataclasses.field(default_factory=set)
    error_lines: set = dataclasses.field(default_factory=set)
    records: int = 0
    dropped_bytes: int = 0


def resume(path, fingerprint: str) -> Done:
    """Read an existing output file. A last line without its newline (the job was killed while
    writing it) is cut off the file; any other line that is not a record of this job is an error."""
    path = pathlib.Path(path)
    done = Done()
    if not path.exists():
        return done
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        done.dropped_bytes = len(data) - end
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    for number, raw in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {number} is not JSON ({e.msg}): not the output of kvjax run? "
                             "choose another --output, or pass --force to start it over") from None
        if not isinstance(rec, dict) or "job" not in rec or "line" not in rec:
            raise InputError(f"{path} line {number} is not a kvjax run record: choose another --output, "
                             "or pass --force to start it over")
        if rec["job"] != fingerprint:
            raise InputError(f"{path} holds records of another job (line {number}: job {rec['job']!r}, this "
                             f"config's is {fingerprint!r}: the model, dtype, sampling, max_new_tokens or chat "
                             "differ): choose another --output, or pass --force to start it over")
        if "policy" in rec:
            done.keys.add(record_key(rec["id"], rec.get("question"), _policy_label(rec["policy"])))
        else:
            done.error_lines.add(rec["line"])
        done.records += 1
    return done


class Writer:
    """Appends records to the output: each `write` is one batch, flushed and fsync'ed, so a job
    killed at any time keeps every batch it finished (and at most a partial last line)."""

    def __init__(self, path, fingerprint: str):
        self.fingerprint = fingerprint
        self.file = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        lines = "".join(json.dumps({**r, "job": self.fingerprint}, ensure_ascii=False, default=str) + "\n"
                        for r in records)
        self.file.write(lines)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def line_error(err: LineError) -> dict:
    return {"id": err.id, "line": err.line, "error": err.error}
