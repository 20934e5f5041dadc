"""The tile-boundary designs of tests/tiles.py: every GPU kernel file is
listed, its tile constants read, and the shapes the op tests run hit every
boundary class of every tile of every kernel. CPU only (no kernel runs here)."""
from pathlib import Path

import pytest

import tiles

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_file_is_covered():
    files = {f"cuda/{p.name}" for p in (ROOT / "csrc/cuda").iterdir() if p.suffix in (".cu", ".cuh")}
    kernels = {f for f in files if not Path(f).name.startswith("emu")} - tiles.NOT_KERNELS
    assert kernels == set(tiles.KERNELS), "a kernel file without tile coverage and mutation tests (tiles.KERNELS)"
    for name, k in tiles.KERNELS.items():
        assert set(k.warps) <= set(tiles.WARPS)
        for t in k.tests:
            assert t.startswith("-") or t == "emu" or " " in t or (ROOT / t.split("::")[0]).exists(), (name, t)


def test_constants_are_read_from_the_sources():
    # Relations the kernels' comments state: if a constant no longer parses
    # or moves, these name it.
    assert tiles.constant("cuda/flash_attn_fwd_sm80.cuh", "BM") == 16 * tiles.constant(
        "cuda/flash_attn_fwd_sm80.cuh", "kWarps")
    assert tiles.constant("cuda/flash_attn_bwd_sm80.cuh", "kBM", D=128) == 32
    assert tiles.function("cuda/flash_attn_fwd_mfma.cuh", "block_n", 128) == 32
    # A variable template and its uses (BN = kBN<D>), at each head dim.
    assert [tiles.constant("cuda/flash_attn_fwd_sm90.cuh", "BN", D=d) for d in (64, 256)] == [128, 64]
    assert tiles.constant("cuda/decode.cu", "GROUPS", D=64, T=2) == 16
    assert tiles.constant("cuda/moe_route.cu", "kMaxItems", kWarpSize=32) == 8
    with pytest.raises(KeyError, match="no constexpr"):
        tiles.constant("cuda/decode.cu", "kNoSuchTile")


def test_classes_and_cover():
    assert tiles.classes(64) == {0, 1, 2, 62, 63}
    assert tiles.classes((128, 64)) == {0, 1, 2, 126, 127, 63, 64, 65}
    t = {"x": [(8, 4), "+"], "y": [4, "-"]}
    shapes = tiles.cover(t, [{"x": x, "y": y} for x in range(1, 30) for y in range(-9, 9)], seed=1)
    assert not tiles.missing(shapes, t)
    assert tiles.missing([{"x": 0, "y": 0}], t) == tiles.targets(t) - {("y", 4, 0)}


def _attention_shapes(d):
    for causal, w, h, hkv, seqs in tiles.attention_design(d):
        for sq, sk in seqs:
            yield {"sq": sq, "sk": sk, "off": sk - sq, "window": w, "lo": None if w is None else sk - sq - w + 1}


@pytest.mark.parametrize("kernel", tiles.FLASH_KERNELS)
@pytest.mark.parametrize("d", tiles.GPU_HEAD_DIMS)
def test_attention_design_covers_each_kernel(kernel, d):
    assert not tiles.missing(_attention_shapes(d), tiles.flash_attn_tiles(kernel, d))
    for causal, w, h, hkv, seqs in tiles.attention_design(d):
        assert (0, 0) in seqs and (1, 1) in seqs and any(q == 0 < k for q, k in seqs) and \
            any(k == 0 < q for q, k in seqs), "empty, key-only, query-only and one-token sequences in every call"
    modes = {(c, w is None) for c, w, *_ in tiles.attention_design(d)}
    assert modes == {(True, True), (False, True), (True, False)}


def test_decode_design_covers_each_instance():
    design = tiles.decode_design()
    c = "cuda/decode.cu"
    seen = set()
    for e, d, h, hkv, cap, w, seqs in design:
        group = h // hkv
        g = next(t for t in (1, 2, 4, tiles.constant(c, "kMaxGroup")) if t >= min(group, 8))
        seen.add((e, d, g))
        t = tiles.decode_tiles(e, d, g)
        keys = min(w or cap, cap)
        splits = tiles.decode_splits(keys)
        groups = tiles.constant(c, "GROUPS", D=d, T=e)
        shapes = []
        for s in seqs:
            n = min(s, keys)
            first_slot = (s - n) % cap
            shapes.append({"n": n, "tail": tiles.decode_split_shape(n, splits, groups),
                           "wrap": cap - first_slot if 0 < first_slot and cap - first_slot < n else None})
        assert not tiles.missing(shapes, {p: t[p] for p in ("n", "tail", "wrap")}), (e, d, g)
        assert 0 in seqs and splits > 1, "an empty sequence in a batch that splits"
    assert seen == {(e, d, g) for e in (2, 4) for d in tiles.GPU_HEAD_DIMS for g in (1, 2, 4, 8)}
    assert not tiles.missing([{"keys": min(w or cap, cap), "group": h // hkv} for _, _, h, hkv, cap, w, _ in design],
                             {"keys": tiles.decode_tiles(2, 64, 8)["keys"], "group": [8, "+"]})
    for d in tiles.GPU_HEAD_DIMS:
        rows = [{"rows": len(seqs) * h} for _, dd, h, _, _, _, seqs in design if dd == d]
        assert not tiles.missing(rows, {"rows": tiles.decode_tiles(2, d, 1)["rows"]}), d
    assert not tiles.missing([{"per_token": hkv * d // (8 if vec else 1)} for hkv, d, vec, _, _ in tiles.append_design()],
                             tiles.append_tiles())


@pytest.mark.parametrize("kernel", tiles.GEMM_KERNELS)
def test_gemm_design_covers_each_kernel(kernel):
    bk90 = tiles.constant("cuda/grouped_gemm_sm90.cuh", "BK")
    shapes = []
    for k, n, f, counts, bad in tiles.gemm_design():
        shapes += [{"rows": r} for r in counts]
        shapes.append({"k8": k // 8, "n8": n // 8, "f8": f // 8, "ktiles": -(-k // bk90)})
        assert 0 in counts and max(counts) > 128, "an empty expert beside one of more than a full tile"
    assert not tiles.missing(shapes, tiles.gemm_tiles(kernel))


@pytest.mark.parametrize("warp", tiles.WARPS)
def test_moe_designs_cover_route_and_permute(warp):
    by_tile = {}
    for tokens, e, k in tiles.route_design():
        t = tiles.route_tiles(e, warp)
        by_tile.setdefault(str(t["tokens"]), (t, []))[1].append({"tokens": tokens})
    for t, shapes in by_tile.values():
        assert not tiles.missing(shapes, {"tokens": t["tokens"]}), t
    shapes = [{"rows": t * k, "chunks": -(-t * k // 512), "buckets": e + 1, "nvec": h // 8 if h % 8 == 0 else h}
              for t, e, k, h in tiles.permute_design()]
    assert not tiles.missing(shapes, tiles.permute_tiles(2))
    assert any(h % 8 for *_, h in tiles.permute_design()), "the scalar row-copy path"


def test_rope_design_covers_each_path():
    for d in tiles.GPU_HEAD_DIMS:
        for path in ("half", "interleaved", "scalar"):
            shapes = [{"tokens": t} for t, _, _, dd, p in tiles.rope_design() if (dd, p) == (d, path)]
            assert not tiles.missing(shapes, tiles.rope_tiles(d, path)), (d, path)
    walks = [(t, hq + hkv, tiles.rope_head_groups(t, tiles.rope_lanes(d, p), hq + hkv))
             for t, hq, hkv, d, p in tiles.rope_design()]
    assert any(1 < g < heads and heads % g for _, heads, g in walks), "a block walks several heads"


def test_norm_design_covers_each_layout():
    design = tiles.norm_design()
    for dtype, layouts in ((dt, tiles.norm_layouts(dt)) for dt in tiles.NORM_DTYPES):
        widest = {hi for lo, hi in layouts.values()}
        assert widest <= {cols for dt, _, cols in design if dt == dtype}
        for rpb in {cfg[3] for cfg in layouts}:
            widths = {hi for cfg, (lo, hi) in layouts.items() if cfg[3] == rpb}
            rows = [{"rows": r} for dt, r, cols in design if dt == dtype and cols in widths]
            assert not tiles.missing(rows, {"rows": [rpb, "+"]}), (dtype, rpb)


def test_paged_design_covers_both_warp_widths():
    for h, hkv, d, ps, w, seqs in tiles.paged_design():
        shapes = [{"rows": sq * (h // hkv), "sk": sk, "off": sk - sq, "page": sk} for sq, sk in seqs]
        for warp in tiles.WARPS:
            t = tiles.paged_tiles(warp, ps)
            if (h // hkv) % 2 == 0:
                del t["rows"]
            assert not tiles.missing(shapes, t), (h, hkv, d, ps, w, warp)
    assert {d for _, _, d, *_ in tiles.paged_design()} == {64, 128, 256}
