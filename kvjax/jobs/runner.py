"""The batch job: every input line under every policy, in full batches, resumable.

    summary = run_job("configs/jobs/smollm2-compare.yaml", "in.jsonl", "out.jsonl")

Prompt lines are grouped by length bucket (kvjax.prompts.length_bucket of their token count) and
run `batch_size` at a time, so a batch pads little and each (bucket, policy) compiles once. A
context line is compressed once per policy (`kvjax.prefill`) and its questions answered from that
(`generate(prefilled=..., question=[...])`, `batch_size` questions at a time; one at a time on a
mesh, which does not batch several questions of one context). Batches run in order
and, within a batch, the policies in the config's order; each (batch, policy) is appended to the
output and fsync'ed before the next starts. A rerun reads the output first and skips every (id,
question, policy) already there, so a killed job loses at most the batch in flight.

Timings in a record are its batch's (the sequences decoded together share them); `compiled` is
true when that batch compiled a program (the first of its shape or policy), whose time is then in
them. A bad line (kvjax.jobs.records) becomes an error record and the job goes on; a batch that
fails on an input error is retried one sequence at a time, so only the culprit gets an error record.
"""

from __future__ import annotations

import dataclasses
import pathlib
import resource
import sys
import time

from kvjax.errors import InputError, KvjaxError
from kvjax.jobs import config as job_config
from kvjax.jobs.records import Done, Item, LineError, Writer, line_error, read_input, record_key, resume


@dataclasses.dataclass
class Summary:
    input_lines: int = 0
    written: int = 0  # records written by this run (answers and errors)
    already_present: int = 0  # records found in the output from an earlier run
    errors: int = 0  # error records written by this run
    prompt_tokens: int = 0
    generated_tokens: int = 0
    generate_s: float = 0.0  # inside kvjax.prefill / generate
    wall_s: float = 0.0
    batches: int = 0
    compiled_batches: int = 0
    peak_cache_bytes: int = 0  # the largest batch's cache
    host_peak_bytes: int = 0
    device_peak_bytes: int | None = None
    dropped_partial_bytes: int = 0

    def lines(self) -> list[str]:
        rate = self.generated_tokens / self.generate_s if self.generate_s > 0 else 0.0
        out = [f"records: {self.written} written ({self.errors} error{'s' * (self.errors != 1)}), "
               f"{self.already_present} already present; "
               f"{self.input_lines} input lines",
               f"tokens: {self.prompt_tokens} prompt, {self.generated_tokens} generated in {self.batches} batches "
               f"({self.compiled_batches} compiled a program); {rate:.1f} generated tokens/s over "
               f"{self.generate_s:.1f} s of generation, {self.wall_s:.1f} s in all",
               f"memory: largest batch cache {self.peak_cache_bytes / 2**20:.1f} MiB, host peak "
               f"{self.host_peak_bytes / 2**20:.0f} MiB" + ("" if self.device_peak_bytes is None else
                                                          f", device peak {self.device_peak_bytes / 2**20:.0f} MiB")]
        if self.dropped_partial_bytes:
            out.append(f"resumed: cut a partial last line ({self.dropped_partial_bytes} bytes) off the output")
        return out


@dataclasses.dataclass
class _Row:
    item: Item
    ids: list[int]


def _encode(params, cfg, item: Item) -> _Row | LineError:
    """Token ids of a line's prompt or context (chat template applied when asked), checked to fit
    the model with its longest question and max_new_tokens."""
    from kvjax import prompts

    try:
        ids = prompts.encode(params, item.text, cfg.chat, what="context" if item.is_context else "prompt")[0]
        q_len = max((len(q) for q in prompts.encode(params, list(item.questions), False, special_tokens=False,
                                                     what="questions")), default=0) if item.is_context else 0
    except InputError as e:
        return LineError(item.line, item.id, f"line {item.line}: {e}")
    limit = params.config.max_position_embeddings
    if len(ids) + q_len + cfg.max_new_tokens > limit:
        what = f"context of {len(ids)} tokens, a question of {q_len}," if item.is_context else f"prompt of {len(ids)} tokens"
        return LineError(item.line, item.id, f"line {item.line}: too long for the model: {what} and "
                         f"max_new_tokens {cfg.max_new_tokens} exceed its {limit} positions")
    return _Row(item, ids)


def _batches(rows: list[_Row], batch_size: int, limit: int) -> list[list[_Row]]:
    """Prompts grouped by length bucket (shortest first), `batch_size` at a time; then each context."""
    from kvjax.prompts import length_bucket

    by_bucket: dict[int, list[_Row]] = {}
    for r in rows:
        if not r.item.is_context:
            by_bucket.setdefault(length_bucket(len(r.ids), limit), []).append(r)
    out = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        out += [group[i: i + batch_size] for i in range(0, len(group), batch_size)]
    return out + [[r] for r in rows if r.item.is_context]


def _pending(done: Done, batch: list[_Row], spec) -> list[tuple[_Row, int | None]]:
    """The (row, question index) pairs of a batch that the output lacks for this policy."""
    return [(r, q) for r in batch for q in r.item.question_indices
            if record_key(r.item.id, q, spec.label()) not in done.keys]


class _Job:
    def __init__(self, params, cfg, writer: Writer, done: Done, summary: Summary, bar):
        self.params, self.cfg, self.writer, self.done, self.summary, self.bar = params, cfg, writer, done, summary, bar
        s = cfg.sampling
        self.options = dict(max_new_tokens=cfg.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, seed=s.seed, stop=list(s.stop) or None)
        self.started = time.perf_counter()

    def run(self, batch: list[_Row], spec, policy) -> None:
        todo = _pending(self.done, batch, spec)
        if not todo:
            return
        records, batches = self._generate(todo, spec, policy)
        self.writer.write(records)
        sm = self.summary
        sm.written += len(records)
        sm.errors += sum("error" in r for r in records)
        sm.prompt_tokens += sum(r.get("prompt_tokens", 0) for r in records)
        sm.generated_tokens += sum(r.get("generated_tokens", 0) for r in records)
        sm.batches += len(batches)
        sm.compiled_batches += sum(compiled for _, compiled in batches)
        sm.peak_cache_bytes = max([sm.peak_cache_bytes] + [nbytes for nbytes, _ in batches])
        self.bar.update(len(records))
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix_str(f"{self.summary.generated_tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)

    def _generate(self, todo, spec, policy) -> tuple[list[dict], list[tuple[int, bool]]]:
        """(records, (cache bytes, compiled) of each batch run); on an input error, one at a time."""
        try:
            return self._answer(todo, spec, policy)
        except KvjaxError as e:
            if len(todo) > 1:  # find the culprit: one sequence at a time
                records, batches = [], []
                for one in todo:
                    r, b = self._generate([one], spec, policy)
                    records, batches = records + r, batches + b
                return records, batches
            (row, q), = todo
            return [{"id": row.item.id, "line": row.item.line, "question": q, "policy": spec.record(),
                     "error": str(e)}], []

    def _answer(self, todo, spec, policy) -> tuple[list[dict], list[tuple[int, bool]]]:
        import jax

        import kvjax

        t0 = time.perf_counter()
        batches = []
        row = todo[0][0]
        if row.item.is_context:
            before = kvjax.api.compile_counts()
            pre = kvjax.prefill(self.params, [row.ids], policy, max_new_tokens=self.cfg.max_new_tokens,
                                seed=self.cfg.sampling.seed)
            jax.block_until_ready(pre.logits)
            context_s = time.perf_counter() - t0
            compiled = kvjax.api.compile_counts() != before
            records = []
            qs = [q for _, q in todo]
            step = 1 if self.params.mesh is not None else self.cfg.batch_size  # a mesh: one question per call
            for i in range(0, len(qs), step):
                chunk = qs[i: i + step]
                out = kvjax.generate(self.params, prefilled=pre, question=[row.item.questions[q] for q in chunk],
                                     **self.options)
                records += self._records(out, [(row, q) for q in chunk], spec, context_s, compiled)
                batches.append((out.stats["cache_bytes"], compiled or out.stats["compiled"]))
                context_s, compiled = 0.0, False  # counted once, with the context's first questions
        else:
            out = kvjax.generate(self.params, [r.ids for r, _ in todo], policy=policy, **self.options)
            records = self._records(out, todo, spec, 0.0, False)
            batches.append((out.stats["cache_bytes"], out.stats["compiled"]))
        self.summary.generate_s += time.perf_counter() - t0
        return records, batches

    @staticmethod
    def _records(out, todo, spec, extra_prefill_s: float, compiled: bool) -> list[dict]:
        s, n = out.stats, len(todo)
        per_row = s["cache_bytes"] // out.cache.batch_size
        compiled = compiled or bool(s["compiled"])
        records = []
        for i, (row, q) in enumerate(todo):
            rec = {"id": row.item.id, "line": row.item.line, "question": q, "policy": spec.record(),
                   "text": out.text[i], "prompt_tokens": s["prompt_lengths"][i],
                   "generated_tokens": s["generated_lengths"][i], "cache_bytes": per_row,
                   "live_tokens": s["live_tokens"][i], "prefill_s": round(s["prefill_s"] + extra_prefill_s, 4),
                   "decode_s": round(s["decode_s"], 4), "batch": n, "compiled": compiled}
            if row.item.meta is not None:
                rec["meta"] = row.item.meta
            records.append(rec)
        return records


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc="kvjax run", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def _check_paths(input_path: pathlib.Path, output_path: pathlib.Path, force: bool) -> None:
    from kvjax.cli import SHIPPED

    if not input_path.is_file():
        raise FileNotFoundError(f"--input {input_path}: no such file")
    if output_path.resolve() == input_path.resolve():
        raise InputError(f"--output {output_path} is the input file: choose another path")
    if any(root in output_path.resolve().parents for root in SHIPPED) and output_path.exists() and not force:
        raise FileExistsError(f"{output_path} ships with kvjax: choose another --output or pass --force")
    if not output_path.resolve().parent.is_dir():
        raise FileNotFoundError(f"--output {output_path}: its folder does not exist")


def run_job(config, input_path, output_path, *, quiet: bool = False, force: bool = False, params=None) -> Summary:
    """Run a batch job (module docstring). config: a YAML path or a `JobConfig`; force: start the
    output over instead of resuming it; params: an already loaded model (else `config.model` is
    loaded). Returns the Summary; the records are in `output_path`."""
    start = time.perf_counter()
    cfg = config if isinstance(config, job_config.JobConfig) else job_config.load(config)
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    _check_paths(input_path, output_path, force)
    if force and output_path.exists():
        output_path.write_bytes(b"")
    fingerprint = cfg.fingerprint()
    done = resume(output_path, fingerprint)
    summary = Summary(already_present=done.records, dropped_partial_bytes=done.dropped_bytes)
    parsed = read_input(input_path)
    summary.input_lines = len(parsed)
    specs = cfg.policies
    with Writer(output_path, fingerprint) as writer:
        errors = [line_error(p) for p in parsed if isinstance(p, LineError) and p.line not in done.error_lines]
        writer.write(errors)
        summary.written += len(errors)
        summary.errors += len(errors)
        items = [p for p in parsed if isinstance(p, Item) and p.line not in done.error_lines and any(
            record_key(p.id, q, s.label()) not in done.keys for q in p.question_indices for s in specs)]
        if items:
            _run_items(cfg, items, params, writer, done, summary, quiet)
    summary.wall_s = time.perf_counter() - start
    summary.host_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary.device_peak_bytes = _device_peak()
    return summary


def _run_items(cfg, items, params, writer, done, summary, quiet) -> None:
    import kvjax
    from kvjax import validate

    if params is None:
        params = kvjax.load(cfg.model, dtype=cfg.dtype, mesh=cfg.make_mesh())
    policies = []
    for i, spec in enumerate(cfg.policies):
        try:
            policies.append(validate.policy(spec.build(), params.config))
        except KvjaxError as e:
            raise InputError(f"{cfg.source}: policies[{i}] ({spec.name}) does not fit {cfg.model}: {e}") from None
    rows, errors = [], []
    for item in items:
        encoded = _encode(params, cfg, item)
        (errors if isinstance(encoded, LineError) else rows).append(encoded)
    writer.write([line_error(e) for e in errors])
    summary.written += len(errors)
    summary.errors += len(errors)
    batches = _batches(rows, cfg.batch_size, params.config.max_position_embeddings)
    total = sum(len(_pending(done, b, s)) for b in batches for s in cfg.policies)
    with _progress(total, quiet) as bar:
        job = _Job(params, cfg, writer, done, summary, bar)
        for batch in batches:
            for spec, policy in zip(cfg.policies, policies):
                job.run(batch, spec, policy)


def _device_peak() -> int | None:
    try:
        import jax

        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics (CPU)
        return None
    return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])
