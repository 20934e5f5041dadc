#!/usr/bin/env bash
# Checks the AMD ISA of mixkit's matrix-core kernels in a HIP build made with
# -DMIXKIT_HIP_SAVE_TEMPS=ON (hipcc -save-temps=obj writes
# BUILD_DIR/hip/<source>-hip-amdgcn-amd-amdhsa-<arch>.s):
#   - every listed kernel is present in every target's .s file;
#   - each instantiation issues the 32x32x8 MFMA of its element type
#     (bf16: v_mfma_f32_32x32x8bf16_1k, spelled v_mfma_f32_32x32x8_bf16 on
#     gfx94x; f16: v_mfma_f32_32x32x8f16 / _f16), so a silent fallback to
#     scalar FMA code fails CI;
#   - none of them spills or uses scratch (.vgpr_spill_count,
#     .sgpr_spill_count, .private_segment_fixed_size in the code object's
#     metadata).
# Usage: tools/check_mfma_isa.sh BUILD_DIR
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 BUILD_DIR" >&2; exit 2; }
DIR=$1/hip
[[ -d $DIR ]] || { echo "check_mfma_isa: $DIR does not exist (configure with -DMIXKIT_HIP=ON)" >&2; exit 1; }

# source stem : substring of the mangled kernel names that must use MFMA.
# Add a line here for each new matrix-core kernel.
KERNELS="
grouped_gemm:4mfma19grouped_gemm_kernel
grouped_gemm:4mfma20grouped_wgrad_kernel
flash_attn:4mfma2fa16flash_fwd_kernel
flash_attn:4mfma3fab11dkdv_kernel
flash_attn:4mfma3fab9dq_kernel
"

exec python3 - "$DIR" "$KERNELS" <<'PY'
import glob, os, re, sys

d, spec = sys.argv[1], sys.argv[2]
wanted = [tuple(line.split(":", 1)) for line in spec.split() if line.strip()]
mfma = {"4bf16": re.compile(r"\bv_mfma_f32_32x32x8(bf16_1k|_bf16)\b"),
        "3f16": re.compile(r"\bv_mfma_f32_32x32x8_?f16\b")}
any_mfma = re.compile(r"\bv_mfma_\w+")
failed = False


def fail(msg):
    global failed
    failed = True
    print("FAIL:", msg)


for stem, kname in wanted:
    files = sorted(glob.glob(os.path.join(d, f"{stem}-hip-amdgcn-amd-amdhsa-*.s")))
    if not files:
        fail(f"{stem}: no saved device assembly {stem}-hip-amdgcn-amd-amdhsa-*.s in {d} "
             "(build with -DMIXKIT_HIP_SAVE_TEMPS=ON)")
        continue
    for path in files:
        arch = path.rsplit("-", 1)[1][:-2]
        text = open(path).read()
        # Function bodies: from "<symbol>:" to its ".Lfunc_endN:".
        bodies = {m.group(1): m.group(2) for m in
                  re.finditer(r"^(_Z\w+):[^\n]*\n(.*?)^\.Lfunc_end\d+:", text, re.M | re.S)}
        # Kernel metadata entries (YAML list items under amdhsa.kernels).
        meta = {}
        md = text[text.find(".amdgpu_metadata"):]
        for entry in re.split(r"\n  - ", md)[1:]:
            name = re.search(r"\.name:\s+(\S+)", entry)
            if name:
                meta[name.group(1)] = {k: int(v) for k, v in
                                       re.findall(r"\.(vgpr_spill_count|sgpr_spill_count|private_segment_fixed_size"
                                                  r"|vgpr_count|agpr_count|group_segment_fixed_size):\s+(\d+)", entry)}
        kernels = sorted(k for k in bodies if kname in k)
        if not kernels:
            fail(f"{arch} {stem}: no kernel matching {kname}")
            continue
        for k in kernels:
            body = bodies[k]
            want = next((rx for tag, rx in mfma.items() if f"NS_{tag}E" in k), any_mfma)
            n = len(want.findall(body))
            m = meta.get(k, {})
            spills = tuple(m.get(f, 0) for f in ("vgpr_spill_count", "sgpr_spill_count", "private_segment_fixed_size"))
            print(f"{arch} {k}: {n} x {want.pattern}, vgpr {m.get('vgpr_count', '?')} "
                  f"(agpr {m.get('agpr_count', '?')}), lds {m.get('group_segment_fixed_size', '?')} B, "
                  f"spills v/s {spills[0]}/{spills[1]}, scratch {spills[2]} B")
            if n == 0:
                fail(f"{arch} {k}: no {want.pattern} instruction")
            if k not in meta:
                fail(f"{arch} {k}: no code-object metadata entry")
            elif any(spills):
                fail(f"{arch} {k}: register spills or scratch use {spills}")
sys.exit(1 if failed else 0)
PY
