"""Mutation testing of peftlab's core with mutmut: do the tests notice a planted bug?

mutmut (``pip install -e .[mutation]``) copies ``src/peftlab`` to ``mutants/``, plants one small
change at a time (``and``→``or``, ``+``→``-``, a constant, a dropped argument, ...) in the modules
configured under ``[tool.mutmut]`` in pyproject.toml (``methods/``, ``layer.py``, ``io.py``,
``interop/peft.py``, ``adapter_set.py``) and, for each mutant, runs only the tests (of the test
files listed there) that call the mutated function. A mutant is *killed* when a test fails,
*survives* when all pass. Not part of CI: the 2,823 mutants take about 50 minutes on 2 cores.

    python benchmarks/mutation.py run          # fresh run of every mutant, then the report
    python benchmarks/mutation.py run --only 'peftlab.methods.dora.*'   # fresh, these mutants only
    python benchmarks/mutation.py resume       # re-run survivors and unrun mutants (after new tests)
    python benchmarks/mutation.py resume --survivors-only
    python benchmarks/mutation.py report       # the report again from mutants/ (after editing notes)

The report, ``benchmarks/results/mutation.md``, counts per module the mutants tried, killed,
survived and equivalent, and lists every survivor with its diff and the sentence about it from
``benchmarks/mutation_notes.json`` (``{"mutant name": {"equivalent": bool, "note": "..."}}``).
An *equivalent* mutant cannot change behaviour (the same computation written another way, a
default that every caller overrides); a survivor that merely no test exercises is not equivalent:
write the test. Re-run after a method lands and keep the notes current: the report flags survivors
without a note and notes whose mutant no longer survives.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTES = ROOT / "benchmarks" / "mutation_notes.json"
REPORT = RESULTS / "mutation.md"
RUN_INFO = RESULTS / "mutation.json"
LOG = RESULTS / "mutation.log"  # not committed (the progress spinner makes it large)

# Each mutant runs test_reliability's fuzz loop with every damage kind once per source (64 cases
# instead of CI's 320), and one killed save: that test's writer is a subprocess, which imports the
# installed peftlab rather than the mutant, so more kills would only cost time.
MUTATION_ENV = {"PEFTLAB_FUZZ_CASES": "64", "PEFTLAB_KILLS": "1"}

# mutmut's exit codes -> outcome. A timeout is a kill (the mutant made the tests hang).
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}
SURVIVED = {0}
NO_TESTS = {5, 33}


# The bugs planted by hand in issue 17 that the whole suite missed, and the tests that now fail on
# each (checked by applying the change, running the test, and reverting).
PLANTED = [
    ("LoRA dropout active in eval mode (`if self.dropout and self.training` -> `if self.dropout` in "
     "`LoRA.add_delta`)", "test_core.py::test_lora_dropout_is_off_in_eval_mode (both cases)"),
    ("(IA)³ merge scales the weight but not the bias (`bias.mul_(v)` dropped)",
     "test_core.py::test_ia3_merge_scales_the_bias_too, and "
     "test_merge_unmerge_save_load_detach_round_trip for the 12 families with biases"),
    ("LoRA ignores the (IA)³ input scale on a shared layer (`xs = x * l_in` -> `xs = x`)",
     "test_core.py::test_ia3_and_lora_on_one_layer_follow_the_documented_order (both cases)"),
    ("Loader dtype check removed in `io.read_tensors`",
     "test_reliability.py::test_tensors_that_are_not_float16_32_64_or_bfloat16_are_refused "
     "(int32, bool, float8, for load and import_peft)"),
]


def _mutmut() -> list[str]:
    exe = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if exe is None:
        sys.exit("mutmut is not installed: pip install -e '.[mutation]'")
    return [exe]


def run(children: int, only: list[str]) -> None:
    """Fresh run: delete mutants/, run every mutant (or those whose names match a glob of ``only``;
    ``resume`` runs the rest later) with ``children`` workers."""
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    RUN_INFO.unlink(missing_ok=True)
    flags = (f" --children {children}" if children != 2 else "") + "".join(f" --only '{g}'" for g in only)
    _session(children, f"python benchmarks/mutation.py run{flags}", only, counted=True)


def resume(children: int, survivors_only: bool, only: list[str]) -> None:
    """Run again every mutant of mutants/ that did not die (the tests may have changed since) and,
    unless ``survivors_only``, those not run yet; kills stand: more tests cannot revive a mutant.
    ``only``: run every mutant whose name matches one of these globs again, whatever its result."""
    if only:
        flags = "".join(f" --only '{g}'" for g in only) + (f" --children {children}" if children != 2 else "")
        return _session(children, f"python benchmarks/mutation.py resume{flags}", only, counted=True)
    survivors = [n for codes in _results().values() for n, c in codes.items()
                 if c is not None and c not in KILLED]
    flag = " --survivors-only" if survivors_only else ""
    flag += f" --children {children}" if children != 2 else ""
    if survivors_only:  # mutmut runs named mutants again whatever their result
        notes = json.loads(NOTES.read_text()) if NOTES.exists() else {}
        todo = [n for n in survivors if n not in notes]  # a noted survivor was judged already
        return _session(children, f"python benchmarks/mutation.py resume{flag}", todo)
    for meta in (ROOT / "mutants" / "src").rglob("*.py.meta"):  # unnamed: mutmut runs those without one
        data = json.loads(meta.read_text())
        for name in set(survivors) & set(data["exit_code_by_key"]):
            data["exit_code_by_key"][name] = None
        meta.write_text(json.dumps(data, indent=4))
    _session(children, f"python benchmarks/mutation.py resume{flag}")


def _session(children: int, described: str, names: list[str] | None = None, counted: bool = False) -> None:
    """Run mutmut on ``names`` (mutant names or globs), or on the mutants without a result, and
    record the session. ``counted``: ``names`` are globs; the record counts the mutants they match."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **MUTATION_ENV}
    env.pop("PYTHONPATH", None)  # mutmut puts mutants/src first; the original source must not win
    command = [*_mutmut(), "run", "--max-children", str(children), *(names or [])]
    RESULTS.mkdir(parents=True, exist_ok=True)
    todo = len(names) if names and not counted else _unrun() if (ROOT / "mutants").exists() else None
    load_before = os.getloadavg()
    start = time.time()
    with open(LOG, "a") as log:
        rc = subprocess.call(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    info = {
        "command": described,
        "mutants": _matching(names) if counted else todo if names else
        (sum(map(len, _results().values())) if todo is None else todo) - _unrun(),
        "exit_code": rc,
        "wall_s": round(wall),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "mutmut": _version("mutmut"),
        "torch": _version("torch"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "env": " ".join(f"{k}={v}" for k, v in MUTATION_ENV.items()),
    }
    sessions = json.loads(RUN_INFO.read_text()) if RUN_INFO.exists() else []
    RUN_INFO.write_text(json.dumps(sessions + [info], indent=2) + "\n")
    if rc != 0:
        print(f"mutmut exited with {rc}; see {LOG}", file=sys.stderr)
    report()


def _matching(globs: list[str]) -> int:
    return sum(any(fnmatch.fnmatch(n, g) for g in globs) for codes in _results().values() for n in codes)


def _unrun() -> int:
    return sum(c is None for codes in _results().values() for c in codes.values())


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def _results() -> dict[str, dict[str, int | None]]:
    """module -> {mutant name: exit code}, from mutmut's per-file .meta files."""
    out: dict[str, dict[str, int | None]] = {}
    for meta in sorted((ROOT / "mutants" / "src").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        if data["exit_code_by_key"]:
            module = meta.relative_to(ROOT / "mutants" / "src").as_posix()[: -len(".meta")]
            out[module] = data["exit_code_by_key"]
    if not out:
        sys.exit("no mutmut results in mutants/; run first")
    return out


def _diffs(names: list[str]) -> dict[str, str]:
    """The diff of each mutant (mutmut's own rendering), run from the repository root."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return {n: "\n".join(get_diff_for_mutant(n).splitlines()[2:]) for n in names}
    except ImportError:  # another mutmut layout: ask the command line
        return {n: subprocess.run([*_mutmut(), "show", n], capture_output=True, text=True).stdout
                for n in names}
    finally:
        os.chdir(cwd)


def report() -> None:
    results = _results()
    notes = json.loads(NOTES.read_text()) if NOTES.exists() else {}
    sessions = json.loads(RUN_INFO.read_text()) if RUN_INFO.exists() else []
    rows, survivors, unchecked = [], [], Counter()
    totals: Counter[str] = Counter()
    for module, codes in results.items():
        c = Counter()
        for name, code in codes.items():
            if code is None:
                unchecked[module] += 1
                continue
            c["tried"] += 1
            if code in KILLED:
                c["killed"] += 1
            else:  # survived, no tests, suspicious, segfault: the tests did not reliably fail
                if notes.get(name, {}).get("equivalent"):
                    c["equivalent"] += 1
                else:
                    c["survived"] += 1
                survivors.append((module, name, code))
        totals.update(c)
        rows.append((module, c))
    diffs = _diffs([n for _, n, _ in survivors])

    def pct(c: Counter) -> str:
        real = c["tried"] - c["equivalent"]
        return f"{100 * c['killed'] / real:.1f}%" if real else "-"

    lines = ["# Mutation testing of peftlab's core", ""]
    lines += [
        "Generated by `benchmarks/mutation.py` (mutmut; configuration under `[tool.mutmut]` in "
        "pyproject.toml). Each mutant is one small planted change in one function; it runs the "
        "tests, among those of the configured test files, that call the function. **Killed**: a "
        "test failed (or hung: a timeout counts as a kill). **Equivalent**: cannot change "
        "behaviour (see each note). **Survived**: a real change no test noticed.", ""]
    if sessions:
        lines += ["Sessions. A `resume` runs again what had no result or had survived and keeps the "
                  "earlier kills, which is sound while tests are only added or tightened (as here); "
                  "after removing or loosening a test, start a fresh `run`.", ""]
    for info in sessions:
        lines += [
            f"- `{info['command']}`: {info['mutants']} mutants, exit code {info['exit_code']}, "
            f"wall time **{info['wall_s'] // 60} min {info['wall_s'] % 60} s**, finished "
            f"{info['finished']} at commit {info['git_commit']}; {info['cpus']} CPUs shared with "
            f"other jobs (load average {info['load_average_before'][0]} before, "
            f"{info['load_average_after'][0]} after); {info.get('env', '')}; Python {info['python']}, "
            f"mutmut {info['mutmut']}, torch {info['torch']}"]
    lines += [""]
    if unchecked:
        lines += [f"**Incomplete**: {sum(unchecked.values())} mutants not run yet ({dict(unchecked)}); "
                  "`python benchmarks/mutation.py resume` runs them.", ""]
    lines += ["| module | tried | killed | survived | equivalent | killed of non-equivalent |",
              "|---|---:|---:|---:|---:|---:|"]
    for module, c in rows + [("**all**", totals)]:
        lines.append(f"| {module} | {c['tried']} | {c['killed']} | {c['survived']} | "
                     f"{c['equivalent']} | {pct(c)} |")
    lines += ["", "Target: at least 90% of the non-equivalent mutants killed in every module.", ""]

    lines += ["## The planted bugs of issue 17", "", "| planted bug | fails now |", "|---|---|"]
    lines += [f"| {bug} | {test} |" for bug, test in PLANTED] + [""]

    by_module = defaultdict(list)
    for module, name, code in survivors:
        by_module[module].append((name, code))
    missing = [n for _, n, _ in survivors if n not in notes]
    lines += ["## Survivors", ""]
    if missing:
        lines += [f"**{len(missing)} survivors have no note yet** (add them to "
                  "`benchmarks/mutation_notes.json`).", ""]
    for module, items in by_module.items():
        lines += [f"### {module}", ""]
        for name, code in sorted(items, key=lambda x: x[0]):
            note = notes.get(name, {})
            kind = "equivalent" if note.get("equivalent") else (
                "no test calls it" if code in NO_TESTS else "survived")
            lines += [f"- `{name}` ({kind}): {note.get('note', '**no note yet**')}", "",
                      "  ```diff", *("  " + d for d in diffs[name].splitlines()), "  ```", ""]
    unrun = {n for codes in results.values() for n, c in codes.items() if c is None}
    stale = sorted(set(notes) - {n for _, n, _ in survivors} - unrun)  # unrun: not judged yet
    if stale:
        lines += ["## Notes whose mutant no longer survives", "",
                  "These mutants are now killed or gone (the code changed); drop their notes.", ""]
        lines += [f"- `{n}`" for n in stale] + [""]
    REPORT.write_text("\n".join(lines))
    print(f"{totals['tried']} tried, {totals['killed']} killed, {totals['survived']} survived, "
          f"{totals['equivalent']} equivalent ({pct(totals)} of non-equivalent killed); "
          f"{len(missing)} survivors without a note -> {REPORT.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_run = sub.add_parser("run", help="fresh mutmut run, then the report")
    p_run.add_argument("--children", type=int, default=2, help="parallel mutant runs (default 2)")
    p_run.add_argument("--only", action="append", default=[], metavar="GLOB",
                       help="run only the mutants whose names match (repeatable), e.g. "
                       "'peftlab.methods.dora.*'; `resume` runs the others later")
    p_resume = sub.add_parser("resume", help="run the mutants without a result or that survived")
    p_resume.add_argument("--children", type=int, default=2, help="parallel mutant runs (default 2)")
    p_resume.add_argument("--only", action="append", default=[], metavar="GLOB",
                          help="run these mutants again, whatever their result (repeatable)")
    p_resume.add_argument("--survivors-only", action="store_true",
                          help="only the survivors without a note, not the mutants not run yet")
    sub.add_parser("report", help="write the report from the results in mutants/")
    args = parser.parse_args()
    if args.what == "run":
        run(args.children, args.only)
    elif args.what == "resume":
        resume(args.children, args.survivors_only, args.only)
    else:
        report()


if __name__ == "__main__":
    main()
