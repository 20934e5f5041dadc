#!/usr/bin/env python3
"""Mutation sweep of the GPU kernels on the emulated GPU.

Each mutant is one small change to one kernel file of csrc/cuda:
  barrier  one synchronisation statement removed: __syncthreads(), a
           cp.async wait, fence.proxy.async, a wgmma fence or wait;
  flip     a bound or mask comparison with its equality flipped
           (< and <=, > and >=);
  bound    the comparison's right-hand side moved by one in the direction
           the flip does not cover (a < b - 1, a <= b + 1, a > b + 1,
           a >= b - 1), so the two together are the +-1 bound mutants;
  swap     an index pair swapped: [i][j] -> [j][i], f(a, b) -> f(b, a) for
           the kernels' two-index functions (swizzles, masks, LDS layouts).
For each mutant the sweep builds the emulated GPU (ASan, as CI) from a
private copy of the sources, in a build directory of its own, so the tree
itself is never modified; then it runs the file's tests
(tests/tiles.py: KERNELS) on that build, with the race checker on (as
tests/conftest.py sets it), stopping at the first failure, and records
whether the mutant was caught and by which test. Only the objects that
include the mutated file and that the tests can reach are rebuilt: the
generated instantiations of a head dim outside tiles.HEAD_DIMS, or of
float16 where the tests' selection has "not float16", keep the unmutated
code (no mapped test calls them). A mutant that does not compile is recorded
as such and scores nothing. A catch counts only if the catching test passes
on the unmutated sources (the same copy restored and rebuilt; run once per
test and recorded); --baseline full runs all of a file's tests on them first
instead. A survivor is run again when the emulator (csrc/cuda/emu*) has
changed since, and every result from before the race checker. Each record names the emulator (a hash of csrc/cuda/emu*)
and whether its race checker was on.

A mutant that survives is either given a test that catches it or shown to
be equivalent by a comment on its line (or the line above) in the source:
    // mutant-equivalent(barrier): <why the program cannot tell>
with the kinds it covers in parentheses (barrier, flip, bound, swap, or a
comma-separated list); such mutants are reported with the reason and not
run.

Results are appended to bench/results/mutation_sweep.jsonl, one line per
mutant run, keyed by the file, the line's text and the mutation, so a sweep
resumes where it stopped, and reruns what the source has changed under.
Several sweeps may run at once (each with --worker N: its own copy and
build directory; mutants are claimed through lock files). --report writes
bench/results/mutation_sweep.md: the score per kernel file and every
survivor.

    python tools/mutation_sweep.py --files flash_attn_bwd_sm80.cuh --kinds barrier
    python tools/mutation_sweep.py --files decode.cu --kinds flip,bound --sample 20
    python tools/mutation_sweep.py --list --files norm.cu
    python tools/mutation_sweep.py --report
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tiles  # noqa: E402  (the kernel file -> tests table)

RESULTS = ROOT / "bench/results/mutation_sweep.jsonl"
REPORT = ROOT / "bench/results/mutation_sweep.md"
WORK = ROOT / "build/mutation"
KINDS = ("barrier", "flip", "bound", "swap")

# Tests added for survivors (tests/test_mutation_survivors.py), by the kernel
# file whose mutants they catch: run after the file's tests of
# tests/tiles.py, under the same -k selection.
SURVIVORS = "tests/test_mutation_survivors.py"
SURVIVOR_TESTS = {
    "cuda/flash_attn_fwd_sm90.cuh": ("test_grid_stride_over_query_blocks_that_see_no_keys",),
    "cuda/flash_attn_fwd_sm80.cuh": ("test_grid_stride_over_query_blocks_that_see_no_keys",),
}


def file_tests(relpath: str) -> tuple:
    """The pytest arguments of a kernel file's tests: its tests/tiles.py
    mapping, with the survivors' tests for it before the -k selection."""
    tests = tiles.KERNELS[relpath].tests
    extra = tuple(f"{SURVIVORS}::{t}" for t in SURVIVOR_TESTS.get(relpath, ()))
    k = tests.index("-k") if "-k" in tests else len(tests)
    return tests[:k] + extra + tests[k:]


# ---- mutants ------------------------------------------------------------------------

_BARRIER = re.compile(r"(?:\b[\w:]*::)?\b(__syncthreads|cp_async_wait<\d+>|fence_proxy_async|wgmma_fence|"
                      r"wgmma_wait<\d+>|__threadfence(?:_block)?)\s*\(\s*\)\s*;")
# A comparison: spaces on both sides (the project's format; template
# brackets and shifts have none), not part of <<, >>, ->.
_COMPARE = re.compile(r"(?<=\s)(<=|>=|<|>)(?=\s)")
_FLIP = {"<": "<=", "<=": "<", ">": ">=", ">=": ">"}
# The direction of the +-1 bound mutant the flip does not already cover.
_BOUND = {"<": "- 1", "<=": "+ 1", ">": "+ 1", ">=": "- 1"}
_INDEX_FUNCS = re.compile(r"\b(swz\w*|visible|at|lds_\w+|stage_\w+|k_row|q_row|acc_\w+|frag_\w+|x\w_\w+)\s*\(")
_FLOATY = re.compile(r"INFINITY|\d\.\d*f?\b|\.f\b|\d+\.f|float")
_DECL = re.compile(r"^\s*(?:__shared__\s+|static\s+|const\s+)*[\w:<>]+\s+\w+\s*$")
_ANNOT = re.compile(r"mutant-equivalent\(([\w, ]+)\):\s*(.*)")


@dataclass
class Mutant:
    file: str       # under csrc/, e.g. cuda/decode.cu
    line: int       # 1-based
    kind: str
    before: str     # the line's text
    after: str      # the mutated line
    note: str = ""  # what changed, for the report
    nth: int = 0    # earlier lines of the file with the same text

    @property
    def key(self) -> str:
        """Stable across edits elsewhere in the file: the line's text (and
        which of its equal lines it is) and the mutation, not its number."""
        h = hashlib.sha1(f"{self.file}\0{self.before}\0{self.nth}\0{self.after}\0{self.kind}".encode())
        return h.hexdigest()[:16]


def _code_mask(text: str) -> list[bool]:
    """Per character: True where it is code (not a comment or a string)."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            mask[i:j] = [False] * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            mask[i:j] = [False] * (j - i)
            i = j
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            mask[i:j + 1] = [False] * (j + 1 - i)
            i = j + 1
        else:
            i += 1
    return mask


def _operand_end(line: str, start: int) -> int:
    """Index just past the operand that starts at `start` (a comparison's
    right-hand side): up to a delimiter at bracket depth 0."""
    depth, i = 0, start
    while i < len(line):
        ch = line[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and (ch in ";,?:" or line.startswith("&&", i) or line.startswith("||", i)):
            break
        i += 1
    while i > start and line[i - 1] == " ":
        i -= 1
    return i


def _split_args(s: str) -> list[tuple[int, int]] | None:
    """(start, end) of the top-level arguments of a call whose '(' is at s[0]."""
    depth, spans, begin = 0, [], 1
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                spans.append((begin, i))
                return spans
        elif ch == "," and depth == 1:
            spans.append((begin, i))
            begin = i + 1
    return None


def mutants(relpath: str) -> list[Mutant]:
    """Every mutant of one kernel file (relative to csrc/)."""
    text = (ROOT / "csrc" / relpath).read_text()
    mask = _code_mask(text)
    out = []
    offset = 0
    seen: dict[str, int] = {}
    for no, line in enumerate(text.split("\n"), 1):
        nth = seen.get(line, 0)
        seen[line] = nth + 1
        first = len(out)
        code = "".join(ch if mask[offset + j] else " " for j, ch in enumerate(line))
        offset += len(line) + 1
        stripped = code.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("template") or \
                stripped.startswith("static_assert"):
            continue
        for m in _BARRIER.finditer(code):
            out.append(Mutant(relpath, no, "barrier", line, line[:m.start()] + ";" + line[m.end():],
                              f"removed {m.group(1)}()"))
        for m in _COMPARE.finditer(code):
            op = m.group(1)
            if code[m.start() - 2:m.start()] in ("<<", ">>") or "operator" in code:
                continue
            flipped = line[:m.start()] + _FLIP[op] + line[m.end():]
            out.append(Mutant(relpath, no, "flip", line, flipped, f"{op} -> {_FLIP[op]}"))
            rhs0 = m.end() + 1
            rhs1 = _operand_end(code, rhs0)
            rhs = line[rhs0:rhs1]
            if rhs and not _FLOATY.search(rhs):
                bumped = f"{line[:rhs0]}({rhs}) {_BOUND[op]}{line[rhs1:]}"
                out.append(Mutant(relpath, no, "bound", line, bumped, f"{op} {rhs} -> {op} ({rhs}) {_BOUND[op]}"))
        for m in re.finditer(r"\[([^\[\]]+)\]\[([^\[\]]+)\]", code):
            a, b = m.group(1).strip(), m.group(2).strip()
            # Two run-time indices (a literal or a constant size on either
            # side is an array shape or a fragment register, not a pair),
            # outside a declaration.
            if a == b or not (re.search(r"[a-z]", a) and re.search(r"[a-z]", b)) or _DECL.match(code[:m.start()]):
                continue
            swapped = line[:m.start()] + f"[{b}][{a}]" + line[m.end():]
            out.append(Mutant(relpath, no, "swap", line, swapped, f"[{a}][{b}] -> [{b}][{a}]"))
        for m in _INDEX_FUNCS.finditer(code):
            spans = _split_args(code[m.end() - 1:])
            if not spans or len(spans) != 2:
                continue
            base = m.end() - 1
            (a0, a1), (b0, b1) = spans
            a, b = line[base + a0:base + a1].strip(), line[base + b0:base + b1].strip()
            if a == b or not a or not b:
                continue
            swapped = line[:base + a0] + b + ", " + a + line[base + b1:]
            out.append(Mutant(relpath, no, "swap", line, swapped, f"{m.group(1)}({a}, {b}) -> ({b}, {a})"))
        for mu in out[first:]:
            mu.nth = nth
    return out


def annotations(relpath: str) -> dict[int, tuple[set, str]]:
    """{line: (kinds, reason)} from mutant-equivalent comments: a comment
    covers its own line, and the next line when it stands alone."""
    lines = (ROOT / "csrc" / relpath).read_text().split("\n")
    out = {}
    for no, line in enumerate(lines, 1):
        m = _ANNOT.search(line)
        if not m:
            continue
        kinds = {k.strip() for k in m.group(1).split(",")}
        reason = m.group(2).strip()
        # A reason may continue on the following comment lines.
        j = no
        while j < len(lines) and lines[j].strip().startswith("//") and "mutant-equivalent" not in lines[j]:
            reason += " " + lines[j].strip()[2:].strip()
            j += 1
        target = no if line.split("//")[0].strip() else j + 1
        out[target] = (kinds, reason)
    return out


# ---- results ------------------------------------------------------------------------

def _load() -> dict[str, dict]:
    """The latest record per mutant key."""
    out = {}
    if RESULTS.exists():
        for row in RESULTS.read_text().splitlines():
            if row.strip():
                rec = json.loads(row)
                out[rec["key"]] = rec
    return out


def _append(rec: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        fcntl.flock(f, fcntl.LOCK_UN)


def _claim(key: str) -> bool:
    """Takes mutant `key` for this process (lock file with our pid); a claim
    whose process is gone is taken over."""
    d = WORK / "claims"
    d.mkdir(parents=True, exist_ok=True)
    path = d / key
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError):
                path.unlink(missing_ok=True)
    return False


def _release(key: str) -> None:
    (WORK / "claims" / key).unlink(missing_ok=True)


# ---- building and testing -------------------------------------------------------------

def emu_cxx() -> str:
    """The emulated GPU's compiler, as .ci/run builds it: clang 15 where the
    build instruments the kernels for the race checker (MIXKIT_EMU_TRACE),
    else the default g++."""
    return "clang++-15" if "MIXKIT_EMU_TRACE" in (ROOT / "CMakeLists.txt").read_text() else "g++"


class Build:
    """A private copy of the sources and its emulated-GPU build (warp `warp`)."""

    def __init__(self, name: str, warp: int, jobs: int):
        self.dir = WORK / f"{name}-emu{warp}"
        self.src, self.out, self.warp, self.jobs = self.dir / "src", self.dir / "build", warp, jobs
        self.mutated: tuple[Path, str, int] | None = None
        self.rebuilt: list[Path] = []
        self.cxx = emu_cxx()

    def prepare(self) -> None:
        self.src.mkdir(parents=True, exist_ok=True)
        # Only files whose content changed are copied (stamped now, not with
        # the tree's mtime, which may be older than objects built since), so
        # ninja rebuilds only what the tree has changed since the last sweep.
        for p in [ROOT / "CMakeLists.txt", *(ROOT / "csrc").rglob("*")]:
            if p.is_file():
                dst = self.src / p.relative_to(ROOT)
                if not dst.exists() or dst.read_bytes() != p.read_bytes():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, dst)
        if not (self.out / "build.ninja").exists():
            py = sys.executable
            nb = subprocess.run([py, "-m", "nanobind", "--cmake_dir"], capture_output=True, text=True,
                                check=True).stdout.strip()
            hip = os.environ.get("MIXKIT_HIP_CPU_DIR", str(ROOT.parent / "shared/third_party/HIP-CPU"))
            if not Path(hip, "include/hip/hip_runtime.h").exists():
                hip = "/work/shared/third_party/HIP-CPU"
            env = dict(os.environ, CXX=self.cxx, CC=self.cxx.replace("clang++", "clang").replace("g++", "gcc"))
            subprocess.run(["cmake", "-S", str(self.src), "-B", str(self.out), "-G", "Ninja", "-DMIXKIT_EMULATE=ON",
                            f"-DMIXKIT_EMU_WARP={self.warp}", "-DMIXKIT_ASAN=ON", f"-DMIXKIT_HIP_CPU_DIR={hip}",
                            f"-DPython_EXECUTABLE={py}", f"-Dnanobind_DIR={nb}"], check=True,
                           stdout=subprocess.DEVNULL, env=env)
        # The unmutated copy built first: apply() reads which objects include
        # a file from ninja's dependency log.
        ok, log = self.build(None)
        if not ok:
            raise SystemExit(f"the unmutated sources do not build: {_first_error(log)}")

    def _dependents(self, relpath: str) -> list[Path]:
        """The objects whose compilation includes csrc/`relpath` (ninja's deps log)."""
        target = str(self.src / "csrc" / relpath)
        r = subprocess.run(["ninja", "-C", str(self.out), "-t", "deps"], capture_output=True, text=True, check=True)
        out, obj = [], None
        for line in r.stdout.splitlines():
            if line and not line[0].isspace():
                obj = line.split(":")[0]
            elif obj and line.strip() == target:
                out.append(self.out / obj)
        return out

    def apply(self, m: Mutant, unused=lambda obj: False) -> None:
        """Writes the mutant into the copy. Only the objects that include the
        file and that the tests can reach are rebuilt with it: the file keeps
        its old mtime (ninja sees no change), and those objects are deleted
        (ninja rebuilds them). The rest (unused(obj): an instantiation no
        mapped test calls) keep the unmutated code."""
        path = self.src / "csrc" / m.file
        text = path.read_text()
        lines = text.split("\n")
        assert lines[m.line - 1] == m.before, f"{m.file}:{m.line} changed under the sweep"
        deps = self._dependents(m.file)
        if not deps:
            raise SystemExit(f"no object of {self.out} includes {m.file}")
        stamp = path.stat().st_mtime_ns
        self.rebuilt = [o for o in deps if not unused(o)]
        self.mutated = (path, text, stamp)
        lines[m.line - 1] = m.after
        path.write_text("\n".join(lines))
        os.utime(path, ns=(stamp, stamp))
        for o in self.rebuilt:
            o.unlink(missing_ok=True)

    def restore(self) -> None:
        """The unmutated file back; the objects built with the mutant are
        deleted, so the next build rebuilds them from it."""
        if self.mutated:
            path, text, stamp = self.mutated
            path.write_text(text)
            os.utime(path, ns=(stamp, stamp))
            for o in self.rebuilt:
                o.unlink(missing_ok=True)
            self.mutated = None

    def build(self, timeout: float | None) -> tuple[bool, str]:
        """Builds the copy; a build that times out counts as failed."""
        try:
            r = subprocess.run(["cmake", "--build", str(self.out), "--", f"-j{self.jobs}"],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"the build took over {timeout:.0f} s"
        return r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    def core(self) -> str:
        return str(next(self.out.glob("_core*.so")))


_INSTANCE = re.compile(r"gen/(?:flash_attn_\w+_hd(\d+)|grouped_gemm_sm90)_(bf16|f16)\.cpp\.o$")


def unused_instance(tests: tuple) -> "callable":
    """For a kernel file's tests: whether a generated instantiation object is
    one they never call, so a mutant need not be built into it: a head dim
    outside tiles.HEAD_DIMS (the attention tests' head dims), or float16
    where the tests' selection has "not float16"."""
    sel = " ".join(tests[i + 1] for i, t in enumerate(tests[:-1]) if t == "-k")
    no_f16 = "not float16" in sel

    def unused(obj: Path) -> bool:
        m = _INSTANCE.search(obj.as_posix())
        if not m:
            return False
        return (m.group(1) is not None and int(m.group(1)) not in tiles.HEAD_DIMS) or (no_f16 and m.group(2) == "f16")
    return unused


def _print_file_name(cxx: str, lib: str) -> str:
    return subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()


def run_tests(build: Build, tests: tuple, schedule: str, timeout: float) -> tuple[str, str, float, str]:
    """('pass' | 'fail' | 'timeout', first failing test or output tail,
    seconds, the node id of the test that failed or was running when the
    run crashed or timed out ('' if none))."""
    # The emulated GPU's ASan runtime is its compiler's (as in .ci/run);
    # libstdc++ preloaded too, so ASan sees its __cxa_throw.
    asan = _print_file_name(build.cxx, "libclang_rt.asan-x86_64.so" if "clang" in build.cxx else "libasan.so")
    env = dict(os.environ, MIXKIT_CORE=build.core(), MIXKIT_EMU_SCHEDULE=schedule, MIXKIT_EMU_RACECHECK="1",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               LD_PRELOAD=f"{asan} {_print_file_name('g++', 'libstdc++.so')}")
    # -v: each test's node id is printed before it runs, so a crash (an ASan
    # abort) or a timeout still names the test it happened in.
    cmd = [sys.executable, "-m", "pytest", "-x", "-v", "-p", "no:cacheprovider", "-rf", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = re.findall(r"^(tests/\S+::\S+)", out, re.M)
        return "timeout", f"over {timeout:.0f} s", time.time() - t0, started[-1] if started else ""
    if r.returncode == 0:
        return "pass", "", time.time() - t0, ""
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    if failed:
        return "fail", failed[0], time.time() - t0, failed[0]
    # A crash (ASan abort, an emulator error outside a test): the last lines,
    # and the test that was running.
    started = re.findall(r"^(tests/\S+::\S+)", out, re.M)
    return ("fail", "crashed: " + " | ".join(out.strip().splitlines()[-3:])[-400:], time.time() - t0,
            started[-1] if started else "")


# ---- the sweep ------------------------------------------------------------------------

def select(files, kinds, sample: int, seed: int) -> list[Mutant]:
    chosen = []
    for f in files:
        ms = [m for m in mutants(f) if m.kind in kinds]
        barriers = [m for m in ms if m.kind == "barrier"]
        others = [m for m in ms if m.kind != "barrier"]
        if sample and len(others) > sample:
            others = sorted(random.Random(f"{seed}:{f}").sample(others, sample), key=lambda m: (m.line, m.kind))
        chosen += barriers + others
    return chosen


def sweep(args) -> int:
    files = [f if f.startswith("cuda/") else f"cuda/{f}" for f in args.files] if args.files else list(tiles.KERNELS)
    kinds = set(args.kinds.split(","))
    todo = select(files, kinds, args.sample, args.seed)
    if args.only:
        todo = [m for m in todo if m.key in args.only.split(",")]
    done = _load()
    builds: dict[int, Build] = {}
    interrupted = False

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    baseline_ok: dict[tuple, bool] = {}
    try:
        for m in todo:
            ann = annotations(m.file).get(m.line)
            if ann and (m.kind in ann[0] or "all" in ann[0]):
                if done.get(m.key, {}).get("outcome") != "equivalent":
                    _append(dict(_record(m), outcome="equivalent", reason=ann[1]))
                continue
            if _settled(done.get(m.key)) and not args.rerun:
                continue
            if not _claim(m.key):
                continue
            try:
                if _settled(_load().get(m.key)) and not args.rerun:  # another sweep finished it meanwhile
                    continue
                rec = _record(m)
                kernel = tiles.KERNELS[m.file]
                tests = file_tests(m.file)
                for warp in kernel.warps:
                    b = builds.get(warp)
                    if b is None:
                        b = builds[warp] = Build(f"w{args.worker}", warp, args.jobs)
                        b.prepare()
                    if args.baseline == "full" and (m.file, warp) not in baseline_ok:
                        # The unmutated sources must pass the tests, or every
                        # mutant would count as caught; a pass is recorded
                        # against the sources' and tests' hash and reused.
                        bkey = _baseline_key(m.file, warp, tests)
                        if done.get(bkey, {}).get("outcome") != "pass":
                            ok, log = b.build(None)  # the first build of a copy is a full one
                            outcome, test, secs, _ = run_tests(b, tests, args.schedules.split(",")[0],
                                                               args.timeout) if ok else ("fail", log, 0, "")
                            print(f"baseline {m.file} warp {warp}: {outcome} {test} ({secs:.0f} s)", flush=True)
                            if outcome != "pass":
                                raise SystemExit(f"the unmutated build fails {m.file}'s tests at warp {warp}: {test}")
                            done[bkey] = dict(key=bkey, file=m.file, kind="baseline", warp=warp, outcome="pass",
                                              seconds=round(secs), date=time.strftime("%Y-%m-%d %H:%M"))
                            _append(done[bkey])
                        baseline_ok[(m.file, warp)] = True
                    b.apply(m, unused_instance(tests))
                    t0 = time.time()
                    try:
                        ok, log = b.build(args.build_timeout)
                    finally:
                        b.restore()
                    rec.setdefault("build_seconds", []).append(round(time.time() - t0))
                    if not ok:
                        rec.update(outcome="compile-error", detail=_first_error(log), warp=warp)
                        break
                    for sched in args.schedules.split(","):
                        outcome, test, secs, node = run_tests(b, tests, sched, args.timeout)
                        rec.setdefault("runs", []).append(dict(warp=warp, schedule=sched, outcome=outcome,
                                                               seconds=round(secs)))
                        if outcome != "pass":
                            if args.baseline == "catch":
                                # The test that caught the mutant must pass on
                                # the unmutated sources (or it caught nothing):
                                # the same copy, restored and rebuilt.
                                _check_clean(b, m.file, node, sched, args.timeout, done)
                            rec.update(outcome="caught" if outcome == "fail" else "timeout", test=test,
                                       warp=warp, schedule=sched)
                            if node and node != test:
                                rec["running"] = node
                            break
                    if rec.get("outcome"):
                        break
                rec.setdefault("outcome", "survived")
                rec["date"] = time.strftime("%Y-%m-%d %H:%M")
                _append(rec)
                print(f"{rec['outcome']:13} {m.file}:{m.line} {m.kind} {m.note} {rec.get('test', '')}", flush=True)
            finally:
                _release(m.key)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for b in builds.values():
            b.restore()
        # The copies' build outputs stay for the next (incremental) sweep;
        # the copies themselves hold the unmutated sources again.
    return 130 if interrupted else 0


def _settled(rec: dict | None) -> bool:
    """Whether a mutant's result stands: a survivor is run again against a
    changed emulator (a race checker or another scheduler may catch it), and
    any result from before the race checker where the tree now has one."""
    if rec is None or (_racecheck() and not rec.get("racecheck") and rec["outcome"] != "equivalent"):
        return False
    return not (rec["outcome"] == "survived" and rec.get("emulator") != _emulator())


def _check_clean(c: Build, relpath: str, node: str, schedule: str, timeout: float, done: dict) -> None:
    """Raises SystemExit unless test `node` passes on the copy `c` rebuilt
    unmutated; a pass is recorded against the sources' and tests' hash and
    reused."""
    if not node:
        raise SystemExit(f"a {relpath} mutant failed outside any test: run with --baseline full")
    bkey = _baseline_key(relpath, c.warp, (node, schedule))
    if done.get(bkey, {}).get("outcome") == "pass":
        return
    ok, log = c.build(None)  # the copy holds the unmutated sources again
    if not ok:
        raise SystemExit(f"the unmutated sources do not build: {_first_error(log)}")
    outcome, test, secs, _ = run_tests(c, (node,), schedule, timeout)
    print(f"baseline {node} warp {c.warp} {schedule}: {outcome} ({secs:.0f} s)", flush=True)
    if outcome != "pass":
        raise SystemExit(f"the unmutated build fails {node} at warp {c.warp} ({schedule}): {test}")
    done[bkey] = dict(key=bkey, file=relpath, kind="baseline", test=node, schedule=schedule, warp=c.warp,
                      outcome="pass", seconds=round(secs), date=time.strftime("%Y-%m-%d %H:%M"))
    _append(done[bkey])


def _baseline_key(relpath: str, warp: int, tests: tuple) -> str:
    h = hashlib.sha1(f"baseline\0{relpath}\0{warp}\0{tests}".encode())
    files = {t.split("::")[0] for t in tests if t.startswith("tests/")}
    files |= {"tests/conftest.py", "tests/tiles.py", "tests/reference.py"}
    for p in sorted((ROOT / "csrc").rglob("*")) + sorted(ROOT / f for f in files):
        if p.is_file():
            h.update(p.read_bytes())
    return "baseline-" + h.hexdigest()[:16]


def _emulator() -> str:
    """The emulator's version: a hash of csrc/cuda/emu* (a mutant survives
    or not against one emulator; the race checker changes the answer)."""
    h = hashlib.sha1()
    for p in sorted((ROOT / "csrc/cuda").glob("emu*")):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def _record(m: Mutant) -> dict:
    return dict(key=m.key, file=m.file, line=m.line, kind=m.kind, note=m.note, mutated=m.after.strip(),
                emulator=_emulator(), racecheck=_racecheck())


def _racecheck() -> bool:
    """Whether this tree's emulator has the race checker (run_tests turns it on)."""
    return (ROOT / "csrc/cuda/emu_racecheck.cpp").exists()


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if "error" in line:
            return line.strip()[:300]
    return log.strip().splitlines()[-1][:300] if log.strip() else ""


# ---- report ---------------------------------------------------------------------------

def report() -> str:
    recs = _load()
    files, keys = {}, {}
    for r in recs.values():
        if r["kind"] == "baseline" or r["file"] not in tiles.KERNELS:
            continue
        # A record counts while its line still reads as it did.
        if r["file"] not in keys:
            keys[r["file"]] = {m.key: m.line for m in mutants(r["file"])}
        if r["key"] in keys[r["file"]]:
            # The line as the file reads now (edits above it move it).
            files.setdefault(r["file"], []).append(dict(r, line=keys[r["file"]][r["key"]]))
    out = ["# Mutation sweep of the GPU kernels", "",
           "Written by `tools/mutation_sweep.py --report` from `mutation_sweep.jsonl` (see the tool for the",
           "mutation operators). Caught: a test of the file's mapping in tests/tiles.py failed (or the run",
           "timed out) and passes on the unmutated sources; equivalent: a `mutant-equivalent` comment at the",
           "line gives the reason; survived: neither; not compiled: scores nothing. Score = (caught +",
           "equivalent) / (mutants that compiled). Comparison and swap mutants are a seeded sample where the",
           "file has more than the sweep's --sample. Race checker: how many of the run mutants ran with the",
           "emulator's race checker on (independent warps); the others ran on the emulator before it.", "",
           "| kernel file | barriers: caught / equivalent / survived | comparisons + swaps: caught / equivalent / "
           "survived | not compiled | run of the file's barriers, comparisons + swaps | race checker | score |",
           "|---|---|---|---|---|---|---|"]
    survivors = []
    totals = [0] * 8
    for f in sorted(files):
        rs = files[f]

        def count(kinds, outcome):
            return sum(1 for r in rs if r["kind"] in kinds and (r["outcome"] == outcome or
                       (outcome == "caught" and r["outcome"] == "timeout")))
        b = [count({"barrier"}, o) for o in ("caught", "equivalent", "survived")]
        c = [count({"flip", "bound", "swap"}, o) for o in ("caught", "equivalent", "survived")]
        bad = count(set(KINDS), "compile-error")
        every = mutants(f)
        n_b = sum(1 for m in every if m.kind == "barrier")
        n_c = len(every) - n_b
        ran = [r for r in rs if r["outcome"] != "equivalent"]
        checked = sum(1 for r in ran if r.get("racecheck"))
        total = sum(b) + sum(c)
        score = f"{100 * (b[0] + b[1] + c[0] + c[1]) / total:.0f} % of {total}" if total else "-"
        out.append(f"| {f} | {' / '.join(map(str, b))} | {' / '.join(map(str, c))} | {bad} | "
                   f"{sum(b)} of {n_b}, {sum(c)} of {n_c} | {checked} of {len(ran)} | {score} |")
        for i, v in enumerate(b + c + [b[0] + b[1] + c[0] + c[1], total]):
            totals[i] += v
        survivors += [r for r in rs if r["outcome"] in ("survived", "equivalent")]
    if files:
        t = totals
        score = f"{100 * t[6] / t[7]:.0f} % of {t[7]}" if t[7] else "-"
        out.append(f"| all | {t[0]} / {t[1]} / {t[2]} | {t[3]} / {t[4]} / {t[5]} | | | | {score} |")
    by_emu: dict[str, list] = {}
    for rs in files.values():
        for r in rs:
            if r["outcome"] != "equivalent":
                by_emu.setdefault(r.get("emulator", "?"), []).append(r)
    out += ["", "Emulators the mutants ran against (a hash of csrc/cuda/emu*; this tree's: "
            f"{_emulator()}, race checker {'on' if _racecheck() else 'absent'}):", ""]
    for e, rs in sorted(by_emu.items(), key=lambda kv: -len(kv[1])):
        on = "on" if all(r.get("racecheck") for r in rs) else "off (before the race checker)"
        out.append(f"- `{e}`: {len(rs)} mutants, race checker {on}")
    out += ["", "## Barrier removals", "", "Each barrier mutant and what caught it (the first failing test, or the one",
            "running when the emulator aborted the run).", ""]
    for r in sorted((r for rs in files.values() for r in rs if r["kind"] == "barrier"),
                    key=lambda r: (r["file"], r["line"])):
        by = r.get("test") or r.get("reason") or ""
        checker = "race checker on" if r.get("racecheck") else "before the race checker"
        out.append(f"- `{r['file']}:{r['line']}` {r['note']}: {r['outcome']}"
                   + (f" ({checker})" if r["outcome"] != "equivalent" else "") + (f": {by}" if by else ""))
    out += ["", "## Survivors and equivalent mutants", ""]
    for r in sorted(survivors, key=lambda r: (r["file"], r["line"], r["kind"])):
        why = r.get("reason") or "no test catches it yet"
        out.append(f"- `{r['file']}:{r['line']}` {r['kind']} ({r['note']}): {r['outcome']} "
                   f"(emulator {r.get('emulator', '?')}). {why}")
    return "\n".join(out) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a one-line message and exit code 2, no usage dump
        print(f"mutation_sweep: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", nargs="*", help="kernel files (csrc/cuda/NAME); default: every kernel file")
    p.add_argument("--kinds", default=",".join(KINDS), help="mutation kinds (default: all)")
    p.add_argument("--sample", type=int, default=0,
                   help="at most this many comparison and swap mutants a file, a seeded sample (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedules", default="random:1",
                   help="emulated thread orders to try, in turn, until one catches the mutant")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for one mutant's tests")
    p.add_argument("--baseline", choices=("catch", "full"), default="catch",
                   help="catch: the test that caught a mutant is run on the unmutated sources (the same\n"
                        "copy, restored and rebuilt) and must pass; full: every test of a file\n"
                        "runs on the unmutated sources before its first mutant")
    p.add_argument("--build-timeout", type=float, default=1800)
    p.add_argument("--jobs", type=int, default=2, help="build jobs")
    p.add_argument("--worker", type=int, default=0, help="this sweep's number: its own copy and build directory")
    p.add_argument("--only", default="", help="comma-separated mutant keys (from --list): just these")
    p.add_argument("--rerun", action="store_true", help="run mutants that already have a result again")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--report", action="store_true", help=f"write {REPORT.relative_to(ROOT)} and exit")
    args = p.parse_args(argv)
    for k in args.kinds.split(","):
        if k not in KINDS:
            p.error(f"unknown kind {k!r}; kinds: {', '.join(KINDS)}")
    for f in args.files or []:
        if (f if f.startswith("cuda/") else f"cuda/{f}") not in tiles.KERNELS:
            p.error(f"{f} is not a kernel file of tests/tiles.py's KERNELS")
    if args.report:
        REPORT.write_text(report())
        print(REPORT.read_text())
        return 0
    if args.list:
        files = [f if f.startswith("cuda/") else f"cuda/{f}" for f in args.files] if args.files else list(tiles.KERNELS)
        for m in select(files, set(args.kinds.split(",")), args.sample, args.seed):
            print(f"{m.key} {m.file}:{m.line} {m.kind:8} {m.note}")
        return 0
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
