"""Run every benchmark once and write bench/RESULTS.md (tables, the plot, the machine, the profiles of misses).

    scripts/bench                      # everything (about 15 minutes), writes bench/RESULTS.md
    scripts/bench --quick              # shorter runs, to check the scripts (writes bench/RESULTS-quick.md)
    scripts/bench --only dispatch,scaling
    scripts/bench --refresh-analysis   # after editing bench/analysis.md (the hand-written reading of a run)

Needs Redis at BENCH_REDIS_URL (default redis://127.0.0.1:6379/12; the DB is flushed), wrk (installed with
apt-get when missing), py-spy (pip, for profiles), and for the real-CLI section scripts/install-claude.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis

from bench import admission, baseline, components, dispatch, polling, real_cli, scaling, whatif
from bench.common import BENCH_DIR, REDIS_URL, ROOT, Section, md_table, pct, require_redis, require_wrk

ORDER = ("admission", "polling", "components", "whatif", "dispatch", "baseline", "scaling", "real_cli")
ANALYSIS = BENCH_DIR / "analysis.md"
BEGIN, END = "<!-- bench/analysis.md -->", "<!-- end of bench/analysis.md -->"


def pressure() -> str:
    """CPU and IO pressure (PSI 'some', avg60 %) now: how busy the shared machine was."""
    parts = []
    for kind in ("cpu", "io"):
        try:
            line = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            parts.append(f"{kind} {line.split('avg60=')[1].split()[0]}%")
        except (OSError, IndexError):
            parts.append(f"{kind} ?")
    return ", ".join(parts)


def machine(conn: redis.Redis) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0].split(" [")[0]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "api", "worker", "shared"], cwd=ROOT, capture_output=True,
                           text=True).stdout.splitlines()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("rq", "redis", "fastapi", "uvicorn"))
    rows = [["CPUs (nproc)", str(os.cpu_count())], ["CPU model", cpu], ["kernel", platform.release()],
            ["Python", platform.python_version()], ["Redis server", str(conn.info("server")["redis_version"])],
            ["load tool", wrk], ["libraries", versions],
            ["code measured", f"git {head.strip()} + {len(dirty)} uncommitted files in api/ worker/ shared/"]]
    return md_table(["", ""], rows)


def headline(sections: dict[str, Section]) -> str:
    rows: list[list[str]] = []
    if "admission" in sections:
        d = sections["admission"].data
        for key, name in (("floor", "floor (FastAPI + 1 async Redis GET)"), ("admitted", "POST /agent/ask admitted"),
                          ("refused", "POST /agent/ask refused (429)")):
            r = d[key]
            rows.append([name, f"{r.rps:,.0f} req/s ({100 * r.rps / d['floor'].rps:.0f}% of floor), "
                               f"p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms"])
    if "polling" in sections:
        d = sections["polling"].data
        for key in ("queued", "started", "finished"):
            r = d[key]
            share = 100 * r.rps / d["floor"].rps
            rows.append([f"GET /agent/jobs/{{id}}, {key} job",
                         f"{r.rps:,.0f} req/s ({share:.0f}% of floor), p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms"])
    if "dispatch" in sections:
        for key, values in sections["dispatch"].data["spans"].items():
            if not key.startswith(" "):
                rows.append([f"dispatch: {key}", f"p50 {pct(values, 50):.1f} ms, p99 {pct(values, 99):.1f} ms"])
    if "scaling" in sections:
        res = sections["scaling"].data["results"]
        rows.append(["jobs/s with 1/2/4/8 workers (1 s stub)", " / ".join(f"{j / m:.2f}" for _, j, m, _ in res)])
    if "real_cli" in sections and "shares" in sections["real_cli"].data:
        d = sections["real_cli"].data
        rows.append(["real CLI: POST -> result seen; queue's share",
                     f"p50 {pct(d['spans']['POST -> result seen (total)'], 50):.0f} ms; {pct(d['shares'], 50):.1f}%"])
    return md_table(["measure", "figure"], rows)


def analysis_block() -> str:
    """bench/analysis.md between markers, so `--refresh-analysis` can replace it in an existing RESULTS.md."""
    text = ANALYSIS.read_text().strip() if ANALYSIS.exists() else ""
    return f"{BEGIN}\n{text}\n{END}"


def refresh_analysis(path: Path) -> int:
    results = path.read_text()
    if BEGIN not in results or END not in results:
        print(f"bench: no analysis markers in {path}", file=sys.stderr)
        return 1
    head, rest = results.split(BEGIN, 1)
    path.write_text(head + analysis_block() + rest.split(END, 1)[1])
    print(f"bench: replaced the reading in {path} with {ANALYSIS}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (checks the scripts, not the numbers)")
    parser.add_argument("--only", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles of missed targets")
    parser.add_argument("--output", type=Path, help="default bench/RESULTS.md (bench/RESULTS-quick.md with --quick)")
    parser.add_argument("--refresh-analysis", action="store_true",
                        help="only put the current bench/analysis.md into the existing output, run nothing")
    args = parser.parse_args()
    if args.refresh_analysis:
        return refresh_analysis(args.output or BENCH_DIR / "RESULTS.md")
    chosen = [name for name in ORDER if name in args.only.split(",")]
    output = args.output or BENCH_DIR / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    conn = require_redis()
    require_wrk()
    rounds, duration = (1, 3.0) if args.quick else (3, 8.0)
    profile = not args.no_profile
    work = Path(tempfile.mkdtemp(prefix="bench-all-"))
    runners: dict[str, Callable[[Path], Section]] = {
        "admission": lambda w: admission.run(w, conn, rounds=rounds, duration_s=duration, profile=profile),
        "polling": lambda w: polling.run(w, conn, rounds=rounds, duration_s=duration, profile=profile),
        "components": lambda w: components.run(w, conn),
        "whatif": lambda w: whatif.run(w, conn, rounds=1 if args.quick else 3, duration_s=duration * 0.75,
                                       asks=10 if args.quick else 25),
        "dispatch": lambda w: dispatch.run(w, conn, asks=20 if args.quick else 60, profile=profile),
        "baseline": lambda w: baseline.run(w, conn),
        "scaling": lambda w: scaling.run(w, conn, profile=profile),
        "real_cli": lambda w: real_cli.run(w, conn, asks=3 if args.quick else real_cli.ASKS),
    }
    started = datetime.now(UTC)
    sections: dict[str, Section] = {}
    log_rows = []
    for name in chosen:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        (work / name).mkdir()
        before, t0 = pressure(), time.monotonic()
        sections[name] = runners[name](work / name)
        log_rows.append([name, f"{time.monotonic() - t0:.0f}", before, pressure()])
        print(sections[name].body + "\n", flush=True)
    targets = [t for s in sections.values() for t in s.targets]
    parts = [
        "# Benchmarks: the queue against the floor and the old in-request design",
        f"Written by `scripts/bench{' --quick' if args.quick else ''}` (`.venv/bin/python -m bench.run_all`) on "
        f"{started:%Y-%m-%d %H:%M} UTC; Redis {REDIS_URL} (flushed). Every ratio below was measured within this "
        "one run, against the floor in alternating rounds: this machine is shared and noisy, so absolute req/s "
        "vary from run to run much more than the ratios. How each figure is made: bench/README.md.",
        "## Targets\n\n" + md_table(["target", "measured", "goal", ""], [t.row() for t in targets]),
        "## Headline figures\n\n" + headline(sections),
    ]
    parts.append(analysis_block())
    parts += [f"## {s.title}\n\n{s.body}" for s in sections.values()]
    parts.append("## Machine and run\n\n" + machine(conn) + "\n\nSections (pressure = Linux PSI 'some' avg60, the "
                 "share of time something waited for CPU or IO, read before and after each section):\n\n"
                 + md_table(["section", "seconds", "pressure before", "pressure after"], log_rows))
    output.write_text("\n\n".join(parts) + "\n")
    print(f"bench: wrote {output}; work files in {work} (kept with BENCH_KEEP=1)", file=sys.stderr)
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
