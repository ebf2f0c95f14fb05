"""`kvjax run`, the batch job: its config's errors name the key, the value and what is allowed; on the
embedded model it writes one record per (id, question, policy) and an error record for a bad line;
killed after its first batch and started again, it ends with every record exactly once."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from kvjax.cli import main
from kvjax.errors import InputError
from kvjax.jobs import config as job_config
from kvjax.jobs.records import Item, LineError, parse_line, resume

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """\
model: smollm2-135m
dtype: float32
policies:
  - full
  - {name: snapkv, budget: 16, window: 4}
sampling: {stop: ["\\n"]}
max_new_tokens: 6
batch_size: 2
"""

CONTEXT = "Alice lives in Paris. Bob lives in Berlin. Carol lives in Rome."
LINES = [
    {"id": "p1", "prompt": "The capital of France is"},
    {"id": "p2", "prompt": "Once upon a time, in a land far away, there"},
    {"id": "p3", "prompt": "The three primary colors are"},
    '{"id": "broken", "prompt": "no closing quote}',
    {"id": "c1", "context": CONTEXT, "questions": [" Where does Alice live? Alice lives in",
                                                   " Where does Bob live? Bob lives in"]},
    {"id": 7, "prompt": "Water boils at a temperature of"},
]
POLICIES = [{"name": "full", "options": {}}, {"name": "snapkv", "options": {"budget": 16, "window": 4}}]
#: (id, question) of every answer the input asks for
ANSWERS = [("p1", None), ("p2", None), ("p3", None), ("c1", 0), ("c1", 1), (7, None)]


def _write_job(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    cfg, inp = folder / "job.yaml", folder / "in.jsonl"
    cfg.write_text(CONFIG)
    inp.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in LINES))
    return cfg, inp


def _records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _key(rec: dict):
    return (rec["id"], rec.get("question"), json.dumps(rec.get("policy"), sort_keys=True))


# ------------------------------------------------------------------------------------------------
# the config


def _parse(text: str):
    import yaml

    return job_config.parse(yaml.safe_load(text), "job.yaml")


def test_the_shipped_configs_parse_and_build_their_policies():
    from kvjax import policies

    for name, n in (("smollm2-compare.yaml", 4), ("llama31-8b-gpu.yaml", 3)):
        cfg = job_config.load(ROOT / "configs" / "jobs" / name)
        built = [s.build() for s in cfg.policies]
        assert len(built) == n and all(isinstance(p, policies.Policy) for p in built)
    gpu = job_config.load(ROOT / "configs" / "jobs" / "llama31-8b-gpu.yaml")
    assert gpu.mesh == (2, 1) and gpu.dtype == "bfloat16" and gpu.chat is True
    ada = job_config.load(ROOT / "configs" / "jobs" / "smollm2-compare.yaml").policies[3].build()
    assert isinstance(ada, policies.AdaKV) and ada.inner == policies.SnapKV(budget=128, window=32)


@pytest.mark.parametrize("text, message", [
    ("model: m\npolicy: full\nbatchsize: 4\n",
     "job.yaml: the top level must be keys among ['model', 'dtype', 'mesh', 'policy', 'policies', 'sampling', "
     "'max_new_tokens', 'batch_size', 'chat'] (unknown key), got 'batchsize'"),
    ("policy: full\n", "job.yaml: model must be an embedded model's name"),
    ("model: m\npolicy: full\ndtype: fp8\n", "job.yaml: dtype must be one of ['float32', 'bfloat16', 'float16']"),
    ("model: m\n", "job.yaml: policy/policies must be exactly one of `policy:`"),
    ("model: m\npolicies: []\n", "job.yaml: policies must be a non-empty list of policies, got []"),
    ("model: m\npolicies: [full, {name: snapk, budget: 8}]\n", "job.yaml: policies[1] (snapk): unknown policy 'snapk'"),
    ("model: m\npolicy: {name: snapkv, budgett: 8}\n", "job.yaml: policy (snapkv): SnapKV has no option ['budgett']"),
    ("model: m\npolicies: [full, full]\n", "job.yaml: policies[1] must be a policy not listed before (it repeats "
     "policies[0])"),
    ("model: m\npolicy: full\nsampling: {temperature: -1}\n",
     "job.yaml: sampling.temperature must be a finite number >= 0 (0 = greedy), got -1"),
    ("model: m\npolicy: full\nsampling: {top_p: 2}\n", "job.yaml: sampling.top_p must be a number in (0, 1]"),
    ("model: m\npolicy: full\nsampling: {stop: ['']}\n", "job.yaml: sampling.stop must be a list of non-empty"),
    ("model: m\npolicy: full\nbatch_size: 0\n", "job.yaml: batch_size must be an int >= 1, got 0"),
    ("model: m\npolicy: full\nmax_new_tokens: 2.5\n", "job.yaml: max_new_tokens must be an int >= 1, got 2.5"),
    ("model: m\npolicy: full\nmesh: {data: 2, tensor: 2}\n", "job.yaml: mesh must be keys among ['data', 'model']"),
    ("model: m\npolicy: full\nchat: yes please\n", "job.yaml: chat must be true or false, got 'yes please'"),
    ("- a list\n", "job.yaml: the top level must be a mapping"),
])
def test_config_errors_name_the_key_the_value_and_what_is_allowed(text, message):
    with pytest.raises(InputError) as e:
        _parse(text)
    assert str(e.value).startswith(message), str(e.value)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\npolicies: [full\n")
    with pytest.raises(InputError, match=r"bad.yaml: not valid YAML \(line 3"):
        job_config.load(bad)


def test_a_bad_config_is_one_line_on_stderr_and_exit_status_2(tmp_path, capsys):
    cfg, inp = _write_job(tmp_path)
    cfg.write_text(CONFIG.replace("batch_size: 2", "batch_size: two"))
    assert main(["run", str(cfg), "--input", str(inp), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kvjax run: error: {cfg}: batch_size must be an int >= 1, got 'two'"]
    assert main(["run", str(tmp_path / "absent.yaml"), "--input", str(inp), "--output", "o.jsonl"]) == 2
    assert "No such file" in capsys.readouterr().err


def test_the_fingerprint_follows_what_the_answers_depend_on():
    a = _parse(CONFIG)
    assert _parse(CONFIG.replace("batch_size: 2", "batch_size: 5")).fingerprint() == a.fingerprint()
    assert _parse(CONFIG.replace("max_new_tokens: 6", "max_new_tokens: 7")).fingerprint() != a.fingerprint()
    assert _parse(CONFIG.replace("dtype: float32", "dtype: bfloat16")).fingerprint() != a.fingerprint()


# ------------------------------------------------------------------------------------------------
# input lines and the output file


@pytest.mark.parametrize("line, error", [
    ('{"id": 1, "prompt": "x"', "line 3 is not JSON"),
    ('[1, 2]', "line 3 must be a JSON object, got list"),
    ('{"prompt": "x"}', "line 3: id must be a string or an int, got None"),
    ('{"id": true, "prompt": "x"}', "line 3: id must be a string or an int, got True"),
    ('{"id": 1, "prompt": "x", "question": "y"}', "line 3: unknown key(s) ['question']"),
    ('{"id": 1}', "line 3: exactly one of 'prompt' or 'context'"),
    ('{"id": 1, "prompt": "  "}', "line 3: prompt must be a non-empty string"),
    ('{"id": 1, "context": "c"}', "line 3: questions must be a non-empty list of non-empty strings, got None"),
    ('{"id": 1, "context": "c", "questions": ["a", ""]}', "line 3: questions must be a non-empty list"),
    ('{"id": 1, "prompt": "x", "questions": ["a"]}', "line 3: 'questions' go with 'context'"),
])
def test_a_bad_input_line_becomes_a_line_error_saying_what_is_wrong(line, error):
    parsed = parse_line(3, line)
    assert isinstance(parsed, LineError) and parsed.line == 3 and parsed.error.startswith(error), parsed


def test_good_input_lines():
    assert parse_line(1, '{"id": "a", "prompt": "hi", "meta": {"k": 1}}') == Item(1, "a", "hi", (), {"k": 1})
    item = parse_line(2, '{"id": 5, "context": "c", "questions": ["q1", "q2"]}')
    assert item.is_context and item.question_indices == (0, 1)


def test_resume_cuts_a_partial_last_line_and_refuses_another_jobs_output(tmp_path):
    out = tmp_path / "out.jsonl"
    rec = {"id": "a", "line": 1, "question": None, "policy": {"name": "full", "options": {}}, "text": "x", "job": "J"}
    err = {"id": None, "line": 2, "error": "line 2 is not JSON", "job": "J"}
    whole = json.dumps(rec) + "\n" + json.dumps(err) + "\n"
    out.write_text(whole + '{"id": "b", "line": 3, "quest')
    done = resume(out, "J")
    assert out.read_text() == whole and done.dropped_bytes == len('{"id": "b", "line": 3, "quest')
    assert done.records == 2 and done.error_lines == {2}
    assert done.keys == {('"a"', None, json.dumps({"name": "full", "options": {}}, sort_keys=True))}
    with pytest.raises(InputError, match="holds records of another job"):
        resume(out, "K")
    out.write_text("not json\n" + whole)
    with pytest.raises(InputError, match="line 1 is not JSON"):
        resume(out, "J")


# ------------------------------------------------------------------------------------------------
# the job on the embedded model


@pytest.fixture(scope="module")
def finished(smollm2_dir, tmp_path_factory):
    """The job run once, uninterrupted, in this process: (folder, exit status, stdout)."""
    folder = tmp_path_factory.mktemp("job")
    cfg, inp = _write_job(folder)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(["run", str(cfg), "--input", str(inp), "--output", str(folder / "out.jsonl"), "--quiet"])
    return folder, status, buf.getvalue()


@pytest.mark.slow
def test_one_record_per_id_question_and_policy_and_an_error_record_for_the_bad_line(finished):
    folder, status, stdout = finished
    assert status == 0
    records = _records(folder / "out.jsonl")
    errors = [r for r in records if "error" in r]
    assert errors == [{"id": None, "line": 4, "error": errors[0]["error"], "job": errors[0]["job"]}]
    assert errors[0]["error"].startswith("line 4 is not JSON")
    answers = [r for r in records if "error" not in r]
    want = [(i, q, json.dumps(p, sort_keys=True)) for i, q in ANSWERS for p in POLICIES]
    assert Counter(map(_key, answers)) == Counter(want)
    for r in answers:
        assert isinstance(r["text"], str) and 1 <= r["generated_tokens"] <= 6
        assert r["prompt_tokens"] > 0 and r["cache_bytes"] > 0 and r["prefill_s"] >= 0 and r["decode_s"] >= 0
    full = {(r["id"], r["question"]): r for r in answers if r["policy"]["name"] == "full"}
    snap = {(r["id"], r["question"]): r for r in answers if r["policy"]["name"] == "snapkv"}
    assert all(snap[k]["cache_bytes"] < full[k]["cache_bytes"] for k in full)  # the budget holds less
    assert full[("c1", 0)]["prompt_tokens"] > full[("p1", None)]["prompt_tokens"]  # context + question
    assert "kvjax run: records: 13 written (1 error), 0 already present; 6 input lines" in stdout
    assert "generated tokens/s" in stdout and "memory:" in stdout


@pytest.mark.slow
def test_a_context_is_answered_as_generate_answers_it(finished, smollm2_f32):
    """The job's prefilled context + question equals kvjax.generate(context=..., question=...)."""
    import kvjax

    folder, _, _ = finished
    params = smollm2_f32
    recs = {(r["question"], r["policy"]["name"]): r for r in _records(folder / "out.jsonl") if r["id"] == "c1"}
    questions = LINES[4]["questions"]
    for name, policy in (("full", None), ("snapkv", kvjax.policies.SnapKV(budget=16, window=4))):
        for q, question in enumerate(questions):
            out = kvjax.generate(params, context=CONTEXT, question=question, policy=policy, max_new_tokens=6,
                                 stop=["\n"])
            assert recs[(q, name)]["text"] == out.text[0], (name, q)


@pytest.mark.slow
@pytest.mark.torch
def test_full_cache_answers_equal_transformers_greedy_decoding(finished, smollm2_dir, smollm2_f32):
    """The oracle: transformers (PyTorch, f32) on the converted checkpoint (tests/test_smollm2.py checks
    the conversion against transformers' own GGUF reader), greedy, one prompt at a time; the job
    batched the prompts by length bucket."""
    from conftest import torch_or_skip

    torch = torch_or_skip()
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = smollm2_f32.tokenizer
    folder, _, _ = finished
    prompts = {x["id"]: x["prompt"] for x in LINES if isinstance(x, dict) and "prompt" in x}
    records = [r for r in _records(folder / "out.jsonl") if r.get("policy", {}).get("name") == "full"
               and r["id"] in prompts]
    assert len(records) == 4
    for r in records:
        ids = tok.encode(prompts[r["id"]])
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        n = next((i + 1 for i in range(len(ref)) if "\n" in tok.decode(ref[: i + 1])), len(ref))  # stop "\n"
        assert r["text"] == tok.decode(ref[:n]) and r["generated_tokens"] == n, (r, tok.decode(ref))


@pytest.mark.slow
def test_killed_after_its_first_batch_the_job_resumes_and_writes_every_record_once(finished, tmp_path, capsys):
    ref_folder, _, _ = finished
    cfg, inp = _write_job(tmp_path)
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "kvjax", "run", str(cfg), "--input", str(inp), "--output",
                              str(out), "--quiet"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:  # the bad line's error + the first batch
                break
            time.sleep(0.02)
        assert child.poll() is None, f"the job ended before it was killed: {child.stderr.read().decode()[-2000:]}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    before = out.read_text()
    n_before = before.count("\n")
    assert 3 <= n_before < 13, before
    partial = '{"id": "p9", "line": 9, "question": nu'
    with open(out, "a") as f:  # and a record cut short, as if killed while writing it
        f.write(partial)
    capsys.readouterr()
    assert main(["run", str(cfg), "--input", str(inp), "--output", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert f"{13 - n_before} written (0 errors), {n_before} already present" in stdout
    assert f"cut a partial last line ({len(partial)} bytes)" in stdout
    after = out.read_text()
    assert after.startswith(before)  # nothing written before the kill was touched
    records = _records(out)
    assert len(records) == 13 and len({_key(r) for r in records}) == 13
    reference = {_key(r): r.get("text", r.get("error")) for r in _records(ref_folder / "out.jsonl")}
    assert {_key(r): r.get("text", r.get("error")) for r in records} == reference
    # a third run finds everything done and writes nothing
    assert main(["run", str(cfg), "--input", str(inp), "--output", str(out), "--quiet"]) == 0
    assert "0 written (0 errors), 13 already present" in capsys.readouterr().out
    assert out.read_text() == after
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_mesh_larger_than_the_machine_is_refused_naming_its_sizes():
    import jax

    cfg = _parse("model: m\npolicy: full\nmesh: {data: 64, model: 2}\n")
    assert cfg.mesh == (64, 2)
    with pytest.raises(InputError, match=rf"job.yaml: mesh must be at most {len(jax.devices())} devices in all"):
        cfg.make_mesh()


@pytest.mark.slow
def test_lines_the_model_cannot_take_get_error_records_and_the_rest_still_run(smollm2_f32, tmp_path):
    """Too long for the model, a repeated id: line errors. A ratio budget that leaves a short prompt
    fewer tokens than SnapKV's window fails its batch: the batch is retried one prompt at a time and
    only that prompt gets an error record (with the policy)."""
    from kvjax.jobs import run_job

    cfg = tmp_path / "job.yaml"
    cfg.write_text(CONFIG.replace("  - {name: snapkv, budget: 16, window: 4}\n",
                                  "  - {name: snapkv, budget: 0.1, window: 4}\n"))
    short = "The cat sat on the mat and looked at the dog, who was asleep by the door."
    long_enough = ("The cat sat on the mat and looked at the dog, who was asleep by the door. " * 3).strip()
    lines = [{"id": "huge", "prompt": "word " * 9000}, {"id": "s", "prompt": short},
             {"id": "l", "prompt": long_enough}, {"id": "s", "prompt": "a repeated id"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    n_short = len(smollm2_f32.tokenizer.encode(short))
    assert round(0.1 * n_short) < 4 <= round(0.1 * len(smollm2_f32.tokenizer.encode(long_enough)))
    summary = run_job(cfg, inp, tmp_path / "out.jsonl", quiet=True, params=smollm2_f32)
    records = _records(tmp_path / "out.jsonl")
    errors = {(r["id"], r["line"], (r.get("policy") or {}).get("name")): r["error"] for r in records if "error" in r}
    assert set(errors) == {("s", 4, None), ("huge", 1, None), ("s", 2, "snapkv")}, errors
    assert errors[("s", 4, None)] == "line 4: id 's' repeats line 2"
    assert errors[("huge", 1, None)].startswith("line 1: too long for the model: prompt of 900")
    assert "exceed its 8192 positions" in errors[("huge", 1, None)]
    assert "fewer than the 4 that SnapKV always keeps" in errors[("s", 2, "snapkv")]
    answers = {(r["id"], r["policy"]["name"]) for r in records if "error" not in r}
    assert answers == {("s", "full"), ("l", "full"), ("l", "snapkv")}
    assert summary.errors == 3 and summary.written == 6 and summary.input_lines == 4
