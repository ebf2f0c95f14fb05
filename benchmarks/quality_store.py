"""The quality study's result file: per-prompt records, per-cell cache figures, timings; resumable.

One JSON file per model (benchmarks/results/quality_<model>[tag].json):

    meta      the settings that decide what a record means (model, window, seeds, haystack, ...)
    records   one per (task, length, seed, mode, policy, ratio): the continuation, its score
    cells     one per (length, mode, policy, ratio): cache bytes and budgets of the last batch run
    ppl       one per (policy, ratio, text): streaming perplexity under a budget
    profiles  the XKV profiles used (path, total, retention) per (length, ratio)
    timings   one entry per unit of work (shared prompt pass + decodes, RoCo prefill + decode, ...)

A rerun with the same settings skips every record already present; the file is rewritten
(atomically) after every unit, so an interrupted run loses at most one unit.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

#: meta fields that must agree between a file and a resumed run (records would mean something else)
PINNED = ("model", "dtype", "window", "seed", "haystack", "max_new_tokens", "fit", "profile_prompts",
          "profile_seed")


def record_key(task: str, length: int, seed: int, mode: str, policy: str, ratio) -> str:
    return f"{task}|{length}|{seed}|{mode}|{policy}|{ratio}"


def cell_key(length: int, mode: str, policy: str, ratio) -> str:
    return f"{length}|{mode}|{policy}|{ratio}"


def ppl_key(policy: str, ratio, length: int, seed: int) -> str:
    return f"{policy}|{ratio}|{length}|{seed}"


class Store:
    def __init__(self, path, meta: dict):
        self.path = pathlib.Path(path)
        self.meta = dict(meta)
        self.records: dict[str, dict] = {}
        self.cells: dict[str, dict] = {}
        self.ppl: dict[str, dict] = {}
        self.profiles: dict[str, dict] = {}
        self.timings: list[dict] = []
        self.extra: dict = {}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            clash = {k: (old["meta"].get(k), meta.get(k)) for k in PINNED if old["meta"].get(k) != meta.get(k)}
            if clash:
                raise SystemExit(f"{self.path} was written with other settings {clash} (file, now): resume with the "
                                 "same settings, or write elsewhere with --out / --tag")
            self.records = {_rkey(r): r for r in old.get("records", [])}
            self.cells = {cell_key(c["length"], c["mode"], c["policy"], c["ratio"]): c for c in old.get("cells", [])}
            self.ppl = {ppl_key(r["policy"], r["ratio"], r["length"], r["seed"]): r for r in old.get("ppl", [])}
            self.profiles = old.get("profiles", {})
            self.timings = old.get("timings", [])
            self.extra = old.get("extra", {})
            # lists of what was asked grow with each resumed run (the report shows what is present)
            for k in ("lengths", "tasks", "ratios", "policies", "modes", "ppl_policies", "ppl_ratios"):
                if k in old["meta"] and k in self.meta:
                    self.meta[k] = _union(old["meta"][k], self.meta[k])

    def has(self, task, length, seed, mode, policy, ratio) -> bool:
        return record_key(task, length, seed, mode, policy, ratio) in self.records

    def add(self, record: dict) -> None:
        self.records[_rkey(record)] = record

    def add_cell(self, cell: dict) -> None:
        self.cells[cell_key(cell["length"], cell["mode"], cell["policy"], cell["ratio"])] = cell

    def add_ppl(self, row: dict) -> None:
        self.ppl[ppl_key(row["policy"], row["ratio"], row["length"], row["seed"])] = row

    def time(self, **entry) -> None:
        entry["at"] = round(time.time(), 1)
        self.timings.append(entry)

    def data(self) -> dict:
        return dict(meta=self.meta, records=list(self.records.values()), cells=list(self.cells.values()),
                    ppl=list(self.ppl.values()), profiles=self.profiles, timings=self.timings, extra=self.extra)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data(), indent=0, default=_plain))
        os.replace(tmp, self.path)


def _rkey(r: dict) -> str:
    return record_key(r["task"], r["length"], r["seed"], r["mode"], r["policy"], r["ratio"])


def _union(a, b):
    out = list(a)
    for x in b:
        if x not in out:
            out.append(x)
    return out


def _plain(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


def load(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())
