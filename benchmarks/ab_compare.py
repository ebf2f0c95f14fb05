"""Two versions of kvjax side by side on one machine: the decode and prefill benchmarks of each,
run by that version's own scripts, with the ratios after / before.

    python benchmarks/ab_compare.py --before .ab/before --after . --out benchmarks/results \
        [--decode-only REGEX] [--prefill-only SUBSTRING] [--contexts 32768] [--deadline-s 1500]

Each side is a source tree (a checkout). It is laid out as installed into its own folder, and
its `benchmarks/decode.py` and `benchmarks/prefill.py` run in subprocesses whose `PYTHONPATH` is
that folder, so each side measures its own library with its own synthetic states. The order
alternates (before, after for decode; after, before for prefill) so a slow drift of the device
does not favour one side. Writes ab_<device>.json (both sides' rows and the ratios) and
ab_<device>.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent


def install(tree: pathlib.Path, target: pathlib.Path, log) -> None:
    """Lay the source tree out as installed: `kvjax/` with `models/` and `pallas_kernels/` as its
    subpackages (pyproject's package-dir), so `PYTHONPATH=target` imports this version alone."""
    (target.parent / f"scripts_{target.name}").mkdir(parents=True, exist_ok=True)
    pkg = target / "kvjax"
    shutil.copytree(tree / "kvjax", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("models", "pallas_kernels"):
        shutil.copytree(tree / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    log(f"laid out {tree} as a package in {target}")


def run_script(tree: pathlib.Path, site: pathlib.Path, script: str, args: list[str], out: pathlib.Path, log,
               timeout: float) -> int:
    """Run the side's own script from a copy of its benchmarks folder placed beside no source tree
    (the scripts put their parent folder on sys.path, which would shadow the installed package)."""
    scripts = site.parent / f"scripts_{site.name}" / "benchmarks"
    if not scripts.exists():
        subprocess.run(["cp", "-r", str(tree / "benchmarks"), str(scripts)], check=True)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(scripts / script), "--out", str(out), *args]
    log("run " + " ".join(cmd))
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, env=env, cwd=str(tree), timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    log(f"  rc {rc} after {time.perf_counter() - t0:.0f}s")
    return rc


def _rows(folder: pathlib.Path, prefix: str) -> list[dict]:
    files = sorted(folder.glob(f"{prefix}_*.json"))
    files = [f for f in files if "_probe" not in f.name]
    return json.loads(files[-1].read_text())["rows"] if files else []


def compare(before: list[dict], after: list[dict], key, value: str) -> list[dict]:
    b = {key(r): r for r in before if "error" not in r}
    out = []
    for r in after:
        if "error" in r or key(r) not in b:
            continue
        old = b[key(r)]
        out.append(dict(key=key(r), before=old[value], after=r[value], ratio=r[value] / old[value],
                        batch=r.get("batch"), batch_before=old.get("batch")))
    return out


def markdown(meta, dec, pre) -> str:
    lines = [f"kvjax before ({meta['before']}) vs after ({meta['after']}) on {meta.get('device', '?')}: each side's "
             "own benchmark scripts, one machine, one run. Ratio = after / before (lower is faster).", ""]
    lines += ["| decode row | batch | ms/step before | ms/step after | ratio |", "|---|---|---|---|---|"]
    for r in dec:
        lines.append(f"| {r['key']} | {r['batch']} | {r['before']:.3f} | {r['after']:.3f} | {r['ratio']:.3f} |")
    lines += ["", "| prefill row | s before | s after | ratio |", "|---|---|---|---|"]
    for r in pre:
        lines.append(f"| {'/'.join(map(str, r['key']))} | {r['before']:.3f} | {r['after']:.3f} | {r['ratio']:.3f} |")
    worst = max([abs(r["ratio"] - 1) for r in dec + pre], default=float("nan"))
    lines += ["", f"Largest difference: {100 * worst:.1f}%."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="source tree of the earlier version")
    ap.add_argument("--after", default=str(HERE.parent), help="source tree of the later version")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--decode-only", default=r"^(uniform/ctx32768/B1024/b(1|32|max)/pallas|full/ctx32768/B32768/bmax/pallas)")
    ap.add_argument("--decode-weights", default="unstacked", choices=("stacked", "unstacked"),
                    help="decode.py --weights (unstacked: per-layer buffers, as kvjax.load gives on GPU)")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--prefill-only", default="32768")
    ap.add_argument("--contexts", default="32768")
    ap.add_argument("--deadline-s", type=float, default=1500.0, help="overall; split between the four runs")
    ap.add_argument("--tiny", action="store_true", help="the scripts' miniature CPU mode (checks this script)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[ab {time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    sides = {"before": pathlib.Path(args.before).resolve(), "after": pathlib.Path(args.after).resolve()}
    work = pathlib.Path(tempfile.mkdtemp(prefix="ab_"))
    sites = {}
    for name, tree in sides.items():
        sites[name] = work / f"site_{name}"
        install(tree, sites[name], log)
    tiny = ["--tiny"] if args.tiny else []
    share = lambda: max(60.0, (args.deadline_s - (time.perf_counter() - t_start)) / remaining[0])  # noqa: E731
    order = [("decode.py", "before"), ("decode.py", "after")]
    if not args.skip_prefill:
        order += [("prefill.py", "after"), ("prefill.py", "before")]
    remaining = [len(order)]
    for script, name in order:
        budget = share()
        extra = (["--only", args.decode_only, "--deadline-s", str(budget - 30), "--weights", args.decode_weights]
                 if script == "decode.py"
                 else ["--only", args.prefill_only, "--contexts", args.contexts])
        run_script(sides[name], sites[name], script, extra + tiny, work / name, log, timeout=budget)
        remaining[0] -= 1
    dec = compare(_rows(work / "before", "decode"), _rows(work / "after", "decode"),
                  lambda r: r["name"].replace("/library", ""), "ms_per_step")
    pre = compare(_rows(work / "before", "prefill"), _rows(work / "after", "prefill"),
                  lambda r: (r["policy"], r["ctx"], r["impl"]), "seconds")
    meta = dict(before=str(sides["before"]), after=str(sides["after"]), decode_weights=args.decode_weights,
                wall_s=round(time.perf_counter() - t_start))
    devs = sorted((work / "after").glob("decode_*.json"))
    if devs:
        meta.update(device=json.loads(devs[-1].read_text())["meta"].get("device"))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "tiny" if args.tiny else (meta.get("device") or "device").lower().replace(" ", "_")
    slug += "" if args.decode_weights == "unstacked" else "_stacked"
    raw = {n: dict(decode=_rows(work / n, "decode"), prefill=_rows(work / n, "prefill")) for n in sides}
    (out / f"ab_{slug}.json").write_text(json.dumps(dict(meta=meta, decode=dec, prefill=pre, raw=raw), indent=1,
                                                    default=str))
    md = markdown(meta, dec, pre)
    (out / f"ab_{slug}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
