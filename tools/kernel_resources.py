#!/usr/bin/env python3
"""Static resources of every GPU kernel: registers, spills, stack and static
shared memory per kernel from `ptxas -v` (sm_80, sm_90a), and architected and
accumulation VGPRs, SGPRs, LDS and scratch from the gfx90a ISA that hipcc
writes with -save-temps.

    tools/kernel_resources.py --build --out resources.json        # builds both (minutes)
    tools/kernel_resources.py --cuda-log cuda.log --hip-dir build/hip/hip --out resources.json

The second form reads the builds .ci/run already makes (its CUDA build log
with MIXKIT_PTXAS_VERBOSE, its HIP build with MIXKIT_HIP_SAVE_TEMPS). Kernels
are keyed by their demangled names with anonymous namespaces made equal (nvcc
names them per file, GCC and clang `(anonymous namespace)`), which is how the
emulated GPU's launches (a host build of the same templates) find their row.
Exit status 1 when a kernel spills to memory (`--allow NAME-SUBSTRING` names
the exceptions), so CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled, anonymous namespaces spelled one way."""
    if not names:
        return {}
    cxxfilt = shutil.which("c++filt")
    out = names
    if cxxfilt:
        res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
        out = res.stdout.splitlines()
    return {m: canonical(d) for m, d in zip(names, out)}


def canonical(name: str) -> str:
    # nvcc: "_GLOBAL__N__a250cf50_7_rope_cu_a8323016" demangles as a plain
    # namespace of that name; GCC and clang as "(anonymous namespace)".
    return re.sub(r"_GLOBAL__N__\w+", "(anonymous namespace)", name)


# ---------------------------------------------------------------------------
# ptxas -v
# ---------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes cumulative stack size)?"
                   r"(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict[str, dict[str, dict]]:
    """{arch: {mangled: {registers, spill_stores, spill_loads, stack, smem_static, barriers}}}."""
    out: dict[str, dict[str, dict]] = {}
    cur = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = out.setdefault(m.group(2), {}).setdefault(m.group(1), {})
        elif cur is not None and (m := _PROPS.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _USED.search(line)):
            cur.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0), smem_static=int(m.group(4) or 0))
            cur = None
    return out


# ---------------------------------------------------------------------------
# gfx90a ISA (-save-temps .s files)
# ---------------------------------------------------------------------------

_KERNEL = re.compile(r"^\s*\.amdhsa_kernel (\S+)")
_FIELD = re.compile(r"^\s*\.(amdhsa_next_free_vgpr|amdhsa_next_free_sgpr|amdhsa_accum_offset|"
                    r"amdhsa_group_segment_fixed_size|amdhsa_private_segment_fixed_size)\s+(\d+)")
_META_NAME = re.compile(r"^\s*\.name:\s+(\S+)")
_META = re.compile(r"^\s*\.(agpr_count|vgpr_count|sgpr_count|vgpr_spill_count|sgpr_spill_count):\s+(\d+)")


def parse_amdgcn(text: str) -> dict[str, dict]:
    """{mangled: {vgprs, arch_vgprs, agprs, sgprs, lds_static, scratch, vgpr_spills, sgpr_spills}}: vgprs is the
    total a lane takes of gfx90a's unified register file (architected VGPRs up to the
    accumulation offset, then AGPRs), the figure occupancy depends on."""
    out: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        if m := _KERNEL.match(line):
            cur = out.setdefault(m.group(1), {})
        elif line.strip() == ".end_amdhsa_kernel":
            cur = None
        elif cur is not None and (m := _FIELD.match(line)):
            key = {"amdhsa_next_free_vgpr": "vgprs", "amdhsa_next_free_sgpr": "sgprs",
                   "amdhsa_accum_offset": "arch_vgprs", "amdhsa_group_segment_fixed_size": "lds_static",
                   "amdhsa_private_segment_fixed_size": "scratch"}[m.group(1)]
            cur[key] = int(m.group(2))
    # The metadata block (YAML) has an entry per kernel, starting "  - ."
    # (its arguments' lists are deeper), fields in alphabetical order.
    entry: dict = {}

    def finish():
        if entry.get("name") in out:
            k = out[entry["name"]]
            k["agprs"] = entry.get("agpr_count", 0)
            # VGPR spills go to scratch memory; SGPR spills to VGPR lanes.
            k["vgpr_spills"] = entry.get("vgpr_spill_count", 0)
            k["sgpr_spills"] = entry.get("sgpr_spill_count", 0)

    for line in text.splitlines():
        if line.startswith("  - ."):
            finish()
            entry = {}
            line = line.replace("- ", "", 1)
        if m := _META.match(line):
            entry[m.group(1)] = int(m.group(2))
        elif m := _META_NAME.match(line):
            entry["name"] = m.group(1)
    finish()
    for k in out.values():
        k.setdefault("agprs", 0)
        k.setdefault("vgpr_spills", 0)
        k.setdefault("sgpr_spills", 0)
        # Without AGPRs the accumulation offset is the architected count rounded to 4.
        k.setdefault("arch_vgprs", k.get("vgprs", 0))
    return out


# ---------------------------------------------------------------------------
# Builds
# ---------------------------------------------------------------------------

def _cmake(build: Path, *defines: str, env=None) -> None:
    import nanobind  # noqa: F401 (a build needs it; fail early with a clear message)

    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                    f"-DPython_EXECUTABLE={sys.executable}",
                    f"-Dnanobind_DIR={subprocess.check_output([sys.executable, '-m', 'nanobind', '--cmake_dir'], text=True).strip()}",
                    *defines], check=True, env=env, stdout=subprocess.DEVNULL)


def build_cuda(build: Path, jobs: int) -> str:
    _cmake(build, "-DMIXKIT_CUDA=ON", "-DMIXKIT_PTXAS_VERBOSE=ON")
    # A clean target, so every kernel is compiled (and reported) again.
    subprocess.run(["cmake", "--build", str(build), "--target", "clean"], check=True, stdout=subprocess.DEVNULL)
    res = subprocess.run(["cmake", "--build", str(build), "--target", "mixkit_cuda", "-j", str(jobs)],
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stdout + res.stderr)
    return res.stdout + res.stderr


def build_hip(build: Path, jobs: int) -> Path:
    env = dict(os.environ, HIP_PLATFORM="amd")
    _cmake(build, "-DMIXKIT_HIP=ON", "-DMIXKIT_CUDA=OFF", "-DMIXKIT_HIP_SAVE_TEMPS=ON",
           "-DMIXKIT_HIP_ARCHS=gfx90a", env=env)
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs)], check=True, env=env, stdout=subprocess.DEVNULL)
    return build / "hip"


def collect(cuda_log: str | None, hip_dir: Path | None) -> dict:
    res: dict = {}
    if cuda_log is not None:
        for arch, kernels in parse_ptxas(cuda_log).items():
            names = demangle(list(kernels))
            res[arch] = {
                names[m]: dict(v, mangled=m) for m, v in sorted(kernels.items())}
    if hip_dir is not None:
        kernels: dict[str, dict] = {}
        for s in sorted(hip_dir.glob("*gfx90a.s")):
            kernels.update(parse_amdgcn(s.read_text()))
        names = demangle(list(kernels))
        res["gfx90a"] = {names[m]: dict(v, mangled=m) for m, v in sorted(kernels.items())}
    return res


def problems(res: dict, allow: list[str]) -> list[str]:
    """Kernels that spill to local memory (NVIDIA: ptxas spill bytes; gfx90a:
    VGPR spills or any scratch), unless a substring of `allow` names them.
    SGPR spills land in VGPR lanes, not memory, and do not count."""
    bad = []
    for arch, kernels in res.items():
        for name, k in kernels.items():
            if any(a in name for a in allow):
                continue
            if arch.startswith("sm_") and k.get("spill_stores", 0) + k.get("spill_loads", 0):
                bad.append(f"{arch} {name}: {k['spill_stores']} bytes of spill stores, {k['spill_loads']} of loads")
            elif not arch.startswith("sm_") and (k.get("vgpr_spills", 0) or k.get("scratch", 0)):
                bad.append(f"{arch} {name}: {k['vgpr_spills']} VGPRs spilled, {k['scratch']} bytes of scratch")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda-log", help="a CUDA build log with ptxas -v output")
    p.add_argument("--hip-dir", help="a folder of hipcc -save-temps *gfx90a.s files")
    p.add_argument("--build", action="store_true", help="build CUDA (sm_80, sm_90a) and HIP (gfx90a) under build/")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    p.add_argument("--allow", action="append", default=[], help="a kernel-name substring allowed to spill")
    args = p.parse_args(argv)
    cuda_log = hip_dir = None
    if args.build:
        cuda_log = build_cuda(ROOT / "build" / "resources-cuda", args.jobs)
        hip_dir = build_hip(ROOT / "build" / "resources-hip", args.jobs)
    if args.cuda_log:
        cuda_log = Path(args.cuda_log).read_text(errors="replace")
    if args.hip_dir:
        hip_dir = Path(args.hip_dir)
    if cuda_log is None and hip_dir is None:
        p.error("give --build, or --cuda-log and/or --hip-dir")
    res = collect(cuda_log, hip_dir)
    text = json.dumps(res, indent=1, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    counts = ", ".join(f"{arch} {len(k)}" for arch, k in sorted(res.items()))
    print(f"kernels: {counts}", file=sys.stderr)
    bad = problems(res, args.allow)
    for line in bad:
        print("spill: " + line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
