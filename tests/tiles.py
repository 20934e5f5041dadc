"""Test shapes derived from the GPU kernels' own tile sizes.

The tile constants are read from the kernel sources themselves
(csrc/cuda/*.cu, *.cuh: `constexpr int BM = 16 * kWarps;`, the template
`kBM<D>`, MFMA's `block_n(d)`), so a tile that changes moves the tested
boundaries with it, and a constant that is renamed or stops parsing fails
test collection instead of leaving the old shapes in place.

For a length parameter (Sq, Sk, Sk - Sq, the window, rows per expert, ...)
and a tile t, the boundary classes are the residues 0, 1, 2, t - 2 and t - 1
(mod t): the first element of a tile, the first two of a partial one, and
the last two of a tile, where an off-by-one in a bound or a mask shows.
`cover` picks a few shapes whose parameters hit every class of every tile
together (a greedy covering design over the classes, each shape covering
one class of every parameter at once), not the product of the classes;
`KERNELS` says which tiles and parameters each kernel file has, and
tests/test_tiles.py checks that every kernel file is listed and that each
op test's shapes cover its kernels' classes.
"""
from __future__ import annotations

import functools
import heapq
import random
import re
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"

# ---- reading the constants ------------------------------------------------------

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_CONSTEXPR = re.compile(r"\bconstexpr\s+(?:int|int64_t|uint32_t|unsigned|bool)\s+([^;{]+);")
_FUNCTION = re.compile(r"\b(?:MIXKIT_MFMA_HD|MIXKIT_HD|constexpr)\s+int\s+(\w+)\(([^)]*)\)\s*\{\s*return\s+([^;]+);\s*\}")
_VAR_TEMPLATE = re.compile(r"\btemplate\s*<([^<>]*)>\s*constexpr\s+(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*([^;]+);")
_INCLUDE = re.compile(r'#include\s+"((?:cuda|common)/[\w.]+)"')
_TOKEN = re.compile(r"\s*(\d+[uUlL]*|\w+|<<|>>|<=|>=|==|!=|&&|\|\||::|[-+*/%()<>?:,!&|^~])")


class _Expr:
    """A C integer expression (what tile constants are written in): literals,
    names, casts, sizeof(T), calls of the file's one-line functions, the
    arithmetic, shift, comparison and logical operators and ?:. Division is
    C's (truncating); anything else raises."""

    _BINARY = [("||",), ("&&",), ("|",), ("^",), ("&",), ("==", "!="), ("<", "<=", ">", ">="), ("<<", ">>"),
               ("+", "-"), ("*", "/", "%")]

    def __init__(self, text: str):
        self.text = text
        self.toks = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"cannot read {text!r} at {text[pos:]!r}")
            self.toks.append(m.group(1))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1

    def eval(self, lookup):
        self.i, self.lookup = 0, lookup
        v = self._ternary()
        if self.i != len(self.toks):
            raise ValueError(f"trailing {self.toks[self.i:]} in {self.text!r}")
        return v

    def _peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self, tok=None):
        t = self._peek()
        if tok is not None and t != tok:
            raise ValueError(f"expected {tok!r}, got {t!r} in {self.text!r}")
        self.i += 1
        return t

    def _ternary(self):
        c = self._binary(0)
        if self._peek() == "?":
            self._take()
            a = self._ternary()
            self._take(":")
            b = self._ternary()
            return a if c else b
        return c

    def _binary(self, level):
        if level == len(self._BINARY):
            return self._unary()
        v = self._binary(level + 1)
        while self._peek() in self._BINARY[level]:
            op = self._take()
            w = self._binary(level + 1)
            v = _apply(op, v, w)
        return v

    def _unary(self):
        t = self._peek()
        if t in ("-", "+", "!", "~"):
            self._take()
            v = self._unary()
            return {"-": -v, "+": v, "!": int(not v), "~": ~v}[t]
        return self._primary()

    def _primary(self):
        t = self._take()
        if t == "(":
            v = self._ternary()
            self._take(")")
            return v
        if t is None:
            raise ValueError(f"unexpected end of {self.text!r}")
        if t[0].isdigit():
            return int(t.rstrip("uUlL"))
        while self._peek() == "::":  # a qualified name: its last part
            self._take()
            t = self._take()
        if self._peek() == "(":
            self._take()
            args = []
            while self._peek() != ")":
                args.append(self._ternary())
                if self._peek() == ",":
                    self._take()
            self._take(")")
            if t in ("int", "int64_t", "uint32_t", "unsigned", "size_t", "bool"):
                return int(args[0])
            if t == "sizeof":
                return args[0]
            return self.lookup(t, args)
        return self.lookup(t, None)


def _apply(op, a, b):
    if op == "/":
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    if op == "%":
        return a - b * _apply("/", a, b)
    return {"||": lambda: int(bool(a) or bool(b)), "&&": lambda: int(bool(a) and bool(b)), "|": lambda: a | b,
            "^": lambda: a ^ b, "&": lambda: a & b, "==": lambda: int(a == b), "!=": lambda: int(a != b),
            "<": lambda: int(a < b), "<=": lambda: int(a <= b), ">": lambda: int(a > b), ">=": lambda: int(a >= b),
            "<<": lambda: a << b, ">>": lambda: a >> b, "+": lambda: a + b, "-": lambda: a - b,
            "*": lambda: a * b}[op]()


def _split_top(text, sep=","):
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


@functools.lru_cache(maxsize=None)
def _definitions(relpath: str):
    """{name: [expression, ...]} and {function: (params, expression)} of a
    source file and the mixkit headers it includes."""
    text = _COMMENT.sub("", (CSRC / relpath).read_text())
    # A variable template (`template <int D> constexpr int kBN = ...;`) is
    # also a function of its parameters, and its uses (`kBN<D>`) calls of it.
    templates = {m.group(2): m.group(1) for m in _VAR_TEMPLATE.finditer(text)}
    if templates:
        text = re.sub(r"\b(%s)<([^<>;]*)>" % "|".join(templates), r"\1(\2)", text)
    consts, funcs = {}, {}
    for inc in _INCLUDE.findall(text):
        if (CSRC / inc).exists() and not inc.startswith("cuda/emu"):
            c, f = _definitions(inc)
            for k, v in c.items():
                consts.setdefault(k, []).extend(v)
            funcs.update(f)
    for m in _CONSTEXPR.finditer(text):
        for decl in _split_top(m.group(1)):
            name, eq, expr = decl.partition("=")
            name = name.strip()
            if eq and re.fullmatch(r"\w+", name):
                consts.setdefault(name, []).append(_Expr(expr))
    for m in _VAR_TEMPLATE.finditer(text):
        funcs[m.group(2)] = ([p.split()[-1] for p in templates[m.group(2)].split(",")], _Expr(m.group(3)))
    for m in _FUNCTION.finditer(text):
        params = [p.split()[-1] for p in m.group(2).split(",") if p.strip()]
        funcs[m.group(1)] = (params, _Expr(m.group(3)))
    return consts, funcs


def constant(relpath: str, name: str, **bindings) -> int:
    """The value of constexpr `name` as `relpath` (under csrc/) defines it;
    `bindings` give template parameters (D=128) and build parameters
    (kWarpSize=64). A name defined several times (locals of different
    kernels) must have one value under the bindings."""
    consts, funcs = _definitions(relpath)

    def lookup(n, args, scope=bindings):
        if args is not None:
            if n in scope and callable(scope[n]):
                return scope[n](*args)
            params, expr = funcs[n]
            return expr.eval(lambda m, a: lookup(m, a, {**scope, **dict(zip(params, args))}))
        if n in scope:
            return scope[n]
        if n not in consts:
            raise KeyError(f"{relpath}: no constexpr {n} (was the tile constant renamed?)")
        values = set()
        for expr in consts[n]:
            try:
                values.add(expr.eval(lambda m, a: lookup(m, a, scope)))
            except KeyError:
                continue  # a local of another kernel, in terms of its own template parameters
        if len(values) != 1:
            raise ValueError(f"{relpath}: constexpr {n} has values {values or 'none'} under {bindings}")
        return values.pop()

    return lookup(name, None)


def function(relpath: str, name: str, *args: int) -> int:
    """A one-line host+device function of the kernel source (MFMA's block_n)."""
    _, funcs = _definitions(relpath)
    params, expr = funcs[name]
    env = dict(zip(params, args))
    return expr.eval(lambda n, a: env[n] if a is None else function(relpath, n, *a))


# ---- boundary classes and covering designs ------------------------------------------

@functools.lru_cache(maxsize=None)
def classes(tile) -> frozenset:
    """The boundary residues of a tile t: 0, 1, 2, t - 2, t - 1. A tile given
    as (T, t) is a block of T split among warps (or warpgroups) of t: its
    residues mod T also include one before, at and one after every warp
    boundary k t (rows 64-127 of a 128-row block are the second warpgroup's)."""
    if isinstance(tile, tuple):
        big, sub = tile
        inner = {k * sub + d for k in range(1, big // sub) for d in (-1, 0, 1)}
        return classes(big) | frozenset(r % big for r in inner)
    return frozenset(r % tile for r in (0, 1, 2, tile - 2, tile - 1))


def _size(tile) -> int:
    return tile[0] if isinstance(tile, tuple) else tile


def targets(tiles: dict[str, list]) -> set[tuple]:
    """Every class a shape design must hit: (parameter, T, residue) for each
    boundary residue of each tile of each parameter. A tile list holding "+"
    also needs a value above its largest tile T, more than one full tile
    ((parameter, "over", T)), and one holding "-" a negative value (Sk - Sq:
    (parameter, "negative"))."""
    want = set()
    for p, ts in tiles.items():
        sizes = [t for t in ts if t not in ("-", "+")]
        want |= {(p, _size(t), r) for t in sizes for r in classes(t)}
        if sizes and "+" in ts:
            want.add((p, "over", max(map(_size, sizes))))
        if "-" in ts:
            want.add((p, "negative"))
    return want


def hits(values: dict[str, int], tiles: dict[str, list]) -> set[tuple]:
    """The classes of `targets(tiles)` that one shape with these parameter
    values hits. A length of 0 hits none (empty is a degenerate case, tested
    on its own); a signed parameter (tiles with "-") hits its residues at
    every value."""
    got = set()
    for p, ts in tiles.items():
        v = values.get(p)
        if v is not None:
            got |= _hits1(p, v, tuple(ts))
    return got


@functools.lru_cache(maxsize=1 << 16)
def _hits1(p: str, v: int, ts: tuple) -> frozenset:
    signed = "-" in ts
    if v == 0 and not signed:
        return frozenset()
    sizes = [t for t in ts if t not in ("-", "+")]
    got = {(p, _size(t), v % _size(t)) for t in sizes if v % _size(t) in classes(t)}
    if sizes and v > max(map(_size, sizes)):
        got.add((p, "over", max(map(_size, sizes))))
    if v < 0:
        got.add((p, "negative"))
    return frozenset(got)


def missing(shapes, tiles: dict[str, list[int]]) -> set[tuple]:
    """The classes of `targets(tiles)` that none of `shapes` hits (empty when covered)."""
    got = set()
    for s in shapes:
        got |= hits(s, tiles)
    return targets(tiles) - got


def cover(tiles: dict[str, list], candidates, cost=lambda v: 1.0, seed: int = 0, must=(), each=None):
    """A short list of candidate shapes (dicts of parameter values) that
    together hit every class of `targets(tiles)`: `must` (the degenerate
    shapes, which count for nothing) first, then greedy set cover, most new
    classes per unit of `cost` first, ties broken by a seeded shuffle so
    that the choice is stable. `each = (key, tiles2)` also asks the classes
    of tiles2 within every group of candidates that share v[key] (each
    attention call covers its own Sq, Sk and Sk - Sq classes, while the
    finer ones are shared out among the calls). Raises if some class cannot
    be hit."""
    pool = list(candidates)
    random.Random(seed).shuffle(pool)
    want = set(targets(tiles))
    if each:
        key, tiles2 = each
        for group in {v[key] for v in pool}:
            present = {p: ts for p, ts in tiles2.items()
                       if any(v[key] == group and v.get(p) is not None for v in pool)}
            want |= {(group, h) for h in targets(present)}
    want = sorted(want, key=str)
    bit = {c: 1 << i for i, c in enumerate(want)}
    left = (1 << len(want)) - 1
    memo = {}

    def mask_of(p, v, ts, group=None):
        k = (p, v, group)
        if k not in memo:
            m = 0
            for h in _hits1(p, v, tuple(ts[p])):
                m |= bit.get(h if group is None else (group, h), 0)
            memo[k] = m
        return memo[k]

    scored = []
    for v in pool:
        mask = 0
        for p in tiles:
            if v.get(p) is not None:
                mask |= mask_of(p, v[p], tiles)
        if each:
            for p in tiles2:
                if v.get(p) is not None:
                    mask |= mask_of(p, v[p], tiles2, v[key])
        if mask:
            scored.append((v, mask, cost(v)))
    # Lazy greedy: a candidate's gain only falls as classes get covered, so
    # a stale gain is an upper bound and only the heap's top is re-scored.
    heap = [(-(mask.bit_count() / w), i) for i, (_, mask, w) in enumerate(scored)]
    heapq.heapify(heap)
    chosen = list(must)
    while left:
        if not heap:
            raise ValueError(f"no candidate hits {[c for c in want if bit[c] & left][:8]}")
        _, i = heapq.heappop(heap)
        v, mask, w = scored[i]
        gain = (mask & left).bit_count() / w
        if gain == 0:
            continue
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, i))
            continue
        chosen.append(v)
        left &= ~mask
    return chosen


def merge(*tile_maps: dict[str, list]) -> dict[str, list]:
    """The union of several kernels' {parameter: tiles}."""
    out: dict[str, list] = {}
    for m in tile_maps:
        for p, ts in m.items():
            out[p] = sorted(set(out.get(p, [])) | set(ts), key=str)
    return out


# ---- the kernels' tiles ---------------------------------------------------------------

def _c(kernel: str):
    return functools.partial(constant, kernel)


def flash_attn_tiles(kernel: str, d: int) -> dict[str, list]:
    """{parameter: tile sizes} of one attention kernel file at head dim d:
    query rows per block and per warp (group), keys per block. Sk - Sq (off)
    places the causal diagonal and lo = off - W + 1 the window's edge
    relative to both; off is negative when Sq > Sk."""
    c = _c(kernel)
    name = Path(kernel).stem
    if name == "flash_attn_fwd_sm80":  # 4 warps of 16 rows; every warp sees all BN keys
        rows, keys = [(c("BM"), c("BM") // c("kWarps"))], [c("BN", D=d)]
    elif name == "flash_attn_fwd_sm90":  # 2 warpgroups of 64 rows
        rows, keys = [(c("BM"), c("BM") // c("kWarpgroups"))], [c("BN", D=d)]
    elif name == "flash_attn_bwd_sm80":
        # dkdv: BN keys, 16 a warp, kBM<D> queries a step (16 a warp in the
        # atomic dQ); dq_kernel: BQ rows, 16 a warp, kBNq<D> keys a step.
        w = c("BN") // c("kWarps")
        rows, keys = [(c("BQ"), w), (c("kBM", D=d), w)] if c("kBM", D=d) > w else [(c("BQ"), w), c("kBM", D=d)], \
            [(c("BN"), w), c("kBNq", D=d)]
    elif name == "flash_attn_fwd_mfma":  # 4 wavefronts of 32 queries; every wavefront sees the block's keys
        rows, keys = [(c("kBM"), c("kWaveM"))], [function(kernel, "block_n", d)]
    elif name == "flash_attn_bwd_mfma":  # dkdv: 2 wavefronts of 32 keys; dq: 4 wavefronts of 32 queries
        rows, keys = [(c("kQBM"), c("kQBM") // c("kQWaves")), c("kBM")], \
            [(c("kBN"), c("kBN") // c("kKvWaves")), c("kQBN")]
    else:
        raise KeyError(kernel)
    plain = sorted({_size(t) for t in rows + keys})
    return {"sq": rows + ["+"], "sk": keys + ["+"], "off": plain + ["-", "+"], "window": plain + ["+"],
            "lo": plain + ["-", "+"]}


FLASH_KERNELS = ["cuda/flash_attn_fwd_sm80.cuh", "cuda/flash_attn_fwd_sm90.cuh", "cuda/flash_attn_bwd_sm80.cuh",
                 "cuda/flash_attn_fwd_mfma.cuh", "cuda/flash_attn_bwd_mfma.cuh"]
# The head dims tools/mutation_sweep.py builds mutated attention
# instantiations for (its other head dims keep the unmutated code).
HEAD_DIMS = (64, 128)
# Every GPU kernel's head dims: the attention, decode and rope designs.
GPU_HEAD_DIMS = (64, 128, 256)


def _near(tile_list, top: int) -> list[int]:
    """Values up to `top` in the boundary classes of the tiles: where shapes must be."""
    vals = {0, 1, 2, 3}
    for t in tile_list:
        if t not in ("-", "+"):
            size = _size(t)
            vals |= {k * size + r for k in range(top // size + 1) for r in classes(t)}
    return sorted(v for v in vals if 0 <= v <= top)


@functools.lru_cache(maxsize=None)
def attention_design(d: int) -> tuple:
    """Varlen attention calls (causal, window, H, Hkv, ((Sq, Sk), ...)) that
    together hit every boundary class of every attention kernel at head dim
    d: the windows cover the window's classes across calls; each call's
    sequences cover the block classes of Sq, Sk, Sk - Sq (and the window
    edge, off - W + 1) under that call's mask, and the warp-split classes
    are shared out among the calls. Every call also has an empty sequence,
    one with keys but no queries, one with queries but no keys, a single
    token and one query against 150 keys."""
    t = merge(*(flash_attn_tiles(k, d) for k in FLASH_KERNELS))
    # A call is a forward and a backward over all its sequences: few calls.
    windows = cover({"window": t["window"]}, [{"window": w} for w in _near(t["window"], 300) if w > 0],
                    cost=lambda v: v["window"] + 1000)
    calls = [(True, None), (False, None)] + [(True, w["window"]) for w in windows]
    per_call = {p: sorted({_size(x) for x in t[p] if x not in ("-", "+")} | ({"-", "+"} & set(t[p])), key=str)
                for p in ("sq", "sk", "off", "lo")}
    top = 2 * max(_size(x) for x in t["sk"] if x != "+") + 40
    vals = [v for v in _near(t["sq"] + t["sk"], top) if v >= 16]
    offs = sorted({v for x in vals for v in (x, -x)})

    def values(call, sq, sk):
        w = calls[call][1]
        return {"call": call, "sq": sq, "sk": sk, "off": sk - sq, "window": w,
                "lo": None if w is None else sk - sq - w + 1}

    def cost(v):  # the emulated GPU's time goes by tiles, full or partial: (query, key) block pairs
        w = calls[v["call"]][1]
        seen = v["sk"] if w is None else min(v["sk"], w + 64)
        return (2 + -(-v["sq"] // 64)) * (2 + -(-seen // 64))

    # The classes count only on sequences with at least a warp's 16 rows and
    # 16 keys (one row against many keys hits Sk's classes but exercises few
    # masks); the degenerate sequences come on top.
    cands = []
    for i, (_, w) in enumerate(calls):
        shift = 1 - (w or 1)  # lo = off + shift
        pairs = {(a, b) for a in vals for b in vals} | {(a, a + o) for a in vals for o in offs} | \
            {(a, a + o - shift) for a in vals for o in offs}
        # A seeded sample keeps collection quick (the full set is ~15k pairs a call).
        pairs = sorted((a, b) for a, b in pairs if a >= 16 and b >= 16)
        cands += [values(i, a, b) for a, b in random.Random(i).sample(pairs, min(len(pairs), 2500))]
    chosen = cover(t, cands, cost=cost, seed=d, each=("call", per_call))
    heads = [(2, 1), (1, 1)]  # GQA groups 2 and 1 (the backward sums a group over its heads)
    design = []
    for i, (causal, w) in enumerate(calls):
        seqs = [(0, 0), (0, 5), (7, 0), (1, 1), (1, 150)] + [(v["sq"], v["sk"]) for v in chosen if v["call"] == i]
        design.append((causal, w, *heads[i % len(heads)], tuple(seqs)))
    return tuple(design)


DECODE = "cuda/decode.cu"


def decode_tiles(elem_size: int, d: int, g: int) -> dict[str, list]:
    """{parameter: tiles} of decode_attn_kernel<T, D, G> (elem_size = sizeof(T)):
    its GROUPS lane groups read KB keys each per step, so the visible keys n
    of a split run in steps of GROUPS * KB split among GROUPS; the split
    count follows keys = min(W, C) in units of kMinKeysPerSplit; the ring
    wraps at `wrap` keys into the visible range; the combine kernel puts
    kCombineThreads / D rows in a block; query heads go kMaxGroup a block."""
    c = _c(DECODE)
    groups = c("GROUPS", D=d, T=elem_size)
    step = groups * c("KB", G=g)
    return {"n": [(step, groups), "+"], "tail": [(step, groups)], "wrap": [step],
            "keys": [c("kMinKeysPerSplit"), "+"], "rows": [c("kCombineThreads") // d], "group": [c("kMaxGroup"), g, "+"]}


def decode_splits(keys: int) -> int:
    """The split count decode_splits_gpu picks when the length, not the
    occupancy, limits it (small batches): ceil(keys / kMinKeysPerSplit)
    clamped to [1, kMaxSplits]. The tests check the real count against it."""
    c = _c(DECODE)
    return max(1, min(-(-keys // c("kMinKeysPerSplit")), c("kMaxSplits")))


def decode_split_shape(n: int, splits: int, groups: int) -> int:
    """Keys of the last non-empty split (decode_attn_kernel's per_split)."""
    if n == 0:
        return 0
    per = -(-n // splits)
    per = -(-per // groups) * groups
    return n - (-(-n // per) - 1) * per


@functools.lru_cache(maxsize=None)
def decode_design() -> tuple:
    """decode_attn cases (elem_size, D, H, Hkv, C, W, seqlens), one per kernel
    instance (T's size, D, head tile G: f16 and bf16 share every index),
    two for the 16-bit G = 8 ones. Across cases the group sizes cover the
    head tiles' classes and keys = min(W, C) the split count's; within each
    case the sequences cover the classes of n, of the last split's length
    and of the ring's wrap point, and every case has an empty sequence (its
    splits write empty partials) and a one-token one."""
    c = _c(DECODE)
    layouts = [(e, d, g) for e in (2, 4) for d in (64, 128) for g in (1, 2, 4, c("kMaxGroup"))]
    layouts += [(2, d, c("kMaxGroup")) for d in (64, 128)]
    layouts += [(e, 256, g) for e in (2, 4) for g in (1, 2, 4, c("kMaxGroup"))] + [(2, 256, c("kMaxGroup"))]
    group_of = {1: [1], 2: [2], 4: [3, 4]}
    big = cover({"group": [c("kMaxGroup"), "+"]}, [{"group": x} for x in range(5, 3 * c("kMaxGroup"))],
                cost=lambda v: v["group"])
    group_of[c("kMaxGroup")] = sorted(v["group"] for v in big)
    # At least one split past the first, so that every case has 2 or more.
    keys_all = cover({"keys": [c("kMinKeysPerSplit"), "+"]}, [{"keys": k} for k in range(c("kMinKeysPerSplit") + 2, 600)],
                     cost=lambda v: v["keys"] + 100)
    keys_cycle = sorted(v["keys"] for v in keys_all)
    cases, cands, used = [], [], {g: 0 for g in group_of}
    for i, (e, d, g) in enumerate(layouts):
        group = group_of[g][used[g] % len(group_of[g])]
        used[g] += 1
        keys = keys_cycle[i % len(keys_cycle)]
        # Alternately no window (keys = C), a window below C, a window above C.
        cap, window = [(keys, None), (keys + 37, keys), (keys, keys + 50)][i % 3]
        hkv = 1 + i % 2
        cases.append((e, d, group * hkv, hkv, cap, window))
        t = decode_tiles(e, d, g)
        groups, splits = c("GROUPS", D=d, T=e), decode_splits(keys)
        for seen in range(1, 3 * cap + 20):
            n = min(seen, keys)
            first_slot = (seen - n) % cap
            wrap = cap - first_slot if 0 < first_slot and cap - first_slot < n else None
            cands.append({"case": i, "n": n, "tail": decode_split_shape(n, splits, groups), "wrap": wrap,
                          "seen": seen})
    per_case = {i: decode_tiles(*layouts[i]) for i in range(len(layouts))}
    # One cover over all cases, each case held to its own instance's tiles.
    want_tiles = {"n": [], "tail": [], "wrap": []}
    chosen = []
    for i in range(len(layouts)):
        mine = [v for v in cands if v["case"] == i]
        sub = {p: per_case[i][p] for p in want_tiles}
        chosen += cover(sub, mine, cost=lambda v: 4 + v["n"] / 16 + v["seen"] / 256, seed=i)
    design = []
    for i, (e, d, h, hkv, cap, window) in enumerate(cases):
        seqs = [0, 1] + [v["seen"] for v in chosen if v["case"] == i]
        design.append((e, d, h, hkv, cap, window, tuple(seqs)))
    return tuple(design)


GEMM_KERNELS = ["cuda/grouped_gemm.cu", "cuda/grouped_gemm_sm90.cuh", "cuda/grouped_gemm_mfma.cuh"]


def gemm_tiles(kernel: str) -> dict[str, list]:
    """{parameter: tiles} of one grouped-GEMM kernel file, lengths in the
    kernels' units: rows per expert, K / 8 and N / 8 (16-byte chunks: the
    GPU path takes K and N in multiples of 8), F / 8 of the fused SwiGLU
    and the forward's K slices (ktiles, against the sm_90a pipeline's
    stages). Forward rows and output columns split between warps (or
    warpgroups, wavefronts) of 64; the weight gradient reduces over rows in
    steps of BK and tiles its (K, N) output like the forward's (rows, N)."""
    c = _c(kernel)
    name = Path(kernel).stem
    if name == "grouped_gemm":  # 2 x 2 warps of 64 x 64; SwiGLU: 32 gate columns a warp
        bm, bn, bk = c("BM"), c("BN"), c("BK")
        return {"rows": [(bm, bm // 2), bk, "+"], "k8": [bk // 8, (bm // 8, bm // 16), "+"],
                "n8": [(bn // 8, bn // 16), "+"], "f8": [(bn // 16, bn // 32)]}
    if name == "grouped_gemm_sm90":  # 2 warpgroups of 64 rows; K in kStages-deep slices of BK
        bm, bn, bk = c("BM"), c("BN"), c("BK")
        return {"rows": [(bm, bm // c("kWarpgroups")), "+"], "k8": [bk // 8, "+"], "ktiles": [c("kStages"), "+"],
                "n8": [bn // 8], "f8": [bn // 16]}
    if name == "grouped_gemm_mfma":  # 2 x 2 wavefronts of 64 x 64
        bm, bn, bk = c("kBM"), c("kBN"), c("kBK")
        return {"rows": [(bm, c("kWaveM")), bk, "+"], "k8": [bk // 8, (bm // 8, c("kWaveM") // 8), "+"],
                "n8": [(bn // 8, c("kWaveN") // 8), "+"], "f8": [(c("kSwigluCols") // 8, c("kSwigluCols") // 16)]}
    raise KeyError(kernel)


@functools.lru_cache(maxsize=None)
def gemm_design() -> tuple:
    """Grouped-GEMM cases (K, N, F, counts, bad_rows): rows per expert from
    `counts` (an empty expert always beside one of more than a full tile),
    `bad_rows` rows past offsets[E] (the bad-id bucket); across cases K, N
    and F (the SwiGLU's F, run as w13 (E, 2F, K)) hit every class. The
    weight gradient runs the same cases with (K, N) as its output tile."""
    t = merge(*(gemm_tiles(k) for k in GEMM_KERNELS))
    bk90 = constant(GEMM_KERNELS[1], "BK")
    k8s = cover({"k8": t["k8"], "ktiles": t["ktiles"]},
                [{"k8": x, "ktiles": -(-8 * x // bk90)} for x in range(1, 40)], cost=lambda v: v["k8"] + 8)
    n8s = cover({"n8": t["n8"]}, [{"n8": x} for x in range(1, 40)], cost=lambda v: v["n8"] + 8)
    f8s = cover({"f8": t["f8"]}, [{"f8": x} for x in range(1, 40)], cost=lambda v: v["f8"] + 8)
    rows = cover({"rows": t["rows"]}, [{"rows": x} for x in range(1, 300)], cost=lambda v: v["rows"] + 32)
    counts = sorted(v["rows"] for v in rows)
    big = [x for x in counts if x > max(_size(s) for s in t["rows"] if s != "+")]
    cases = []
    n = max(len(k8s), len(n8s), len(f8s))
    per = -(-len(counts) // n)
    for i in range(n):
        mine = counts[i::n][:per] or [counts[i % len(counts)]]
        # An empty expert beside one with more than a full tile, first or last.
        one_big = big[i % len(big)]
        mine = [0, one_big] + mine if i % 2 == 0 else mine + [one_big, 0]
        cases.append((8 * k8s[i % len(k8s)]["k8"], 8 * n8s[i % len(n8s)]["n8"], 8 * f8s[i % len(f8s)]["f8"],
                      tuple(mine), i % 3))
    return tuple(cases)


MOE = "cuda/moe_route.cu"
WARPS = (32, 64)  # the warp widths the kernels are built for (NVIDIA, AMD)


def _pow2(v: int) -> int:
    p = 1
    while p < v:
        p <<= 1
    return p


def route_group(experts: int, warp: int) -> int:
    """moe_route_gpu's lanes a token: next_pow2(E), at most a warp."""
    return min(warp, _pow2(experts))


def route_tiles(experts: int, warp: int) -> dict[str, list]:
    """moe_route_kernel: a block holds kRouteThreads / group tokens, a token's
    group lanes hold `items` logits each, and slot j of top_k belongs to lane
    j % group."""
    c = _c(MOE)
    group = route_group(experts, warp)
    return {"tokens": [c("kRouteThreads") // group, "+"], "experts": [group * _pow2(-(-experts // group))],
            "top_k": [group]}


@functools.lru_cache(maxsize=None)
def route_design() -> tuple:
    """moe_route calls (tokens, experts, top_k): the experts sit at the
    lanes-per-token and logits-per-lane boundaries of both warp widths, up to
    kMoeMaxExperts; for every tokens-per-block count of either width the
    token counts hit its classes; top_k runs from 1 to E, across the lane
    group's width."""
    c = _c(MOE)
    top = c("kMoeMaxExperts")
    experts = sorted({e for p in range(0, 9) for e in (2 ** p - 1, 2 ** p, 2 ** p + 1) if 1 <= e <= top})
    calls = []
    by_block = {}
    for e in experts:
        for w in WARPS:
            by_block.setdefault(c("kRouteThreads") // route_group(e, w), []).append(e)
    for per_block, es in sorted(by_block.items()):
        toks = cover({"tokens": [per_block, "+"]}, [{"tokens": t} for t in range(1, 3 * per_block)],
                     cost=lambda v: v["tokens"] + 8)
        for i in range(max(len(toks), len(es))):
            e = es[i % len(es)]
            group = route_group(e, 32)
            k = [1, 2, group + 1, e, group][i % 5]
            calls.append((toks[i % len(toks)]["tokens"], e, max(1, min(k, e))))
    return tuple(sorted(set(calls)))


def permute_tiles(elem_size: int) -> dict[str, list]:
    """moe_permute's counting sort: kChunk rows a histogram block, the scan
    walks chunks kBatch at a time, one scan thread a bucket (E + 1 buckets,
    kScanThreads threads); row copies (scatter, gather, weight gradient)
    stride the 16-byte vectors of a row (hidden / VEC, or hidden on the
    scalar path) over kRowThreads threads."""
    c = _c(MOE)
    return {"rows": [c("kChunk"), "+"], "chunks": [c("kBatch"), "+"], "buckets": [c("kScanThreads")],
            "nvec": [c("kRowThreads"), "+"]}


@functools.lru_cache(maxsize=None)
def permute_design() -> tuple:
    """moe_permute / unpermute cases (tokens, experts, top_k, hidden): row
    counts past one chunk and chunk counts hit their classes with few
    experts and a narrow hidden size (one and two rows on top); bucket
    counts and vector counts (16-bit dtypes, both the 16-byte and the scalar
    path) with few tokens."""
    c = _c(MOE)
    t = permute_tiles(2)
    chunk = c("kChunk")
    # A scatter block per token: rows as k copies of few tokens (k up to 8).
    def top_k(r):
        return max(k for k in range(1, 9) if r % k == 0)

    rows = cover({"rows": t["rows"], "chunks": t["chunks"]},
                 [{"rows": r, "chunks": -(-r // chunk)} for r in range(chunk + 1, 11 * chunk)],
                 cost=lambda v: v["rows"] / top_k(v["rows"]) + 64)
    cases = [(1, 8, 1, 8), (1, 3, 2, 8)]  # one row, two rows
    for i, v in enumerate(sorted(rows, key=lambda v: v["rows"])):
        k = top_k(v["rows"])
        cases.append((v["rows"] // k, [8, 11, 60][i % 3], k, 8))
    top = c("kMoeMaxExperts")
    buckets = cover({"buckets": t["buckets"]}, [{"buckets": e + 1} for e in range(1, top + 1)],
                    cost=lambda v: 1)
    vec = 16 // 2
    nvecs = cover({"nvec": t["nvec"]}, [{"nvec": n} for n in range(1, 3 * c("kRowThreads"))],
                  cost=lambda v: v["nvec"] + 64)
    # An odd vector count runs the scalar path (hidden = n, not a multiple of
    # VEC), an even one the 16-byte path (hidden = VEC * n).
    bs = sorted(v["buckets"] for v in buckets)
    for i in range(max(len(bs), len(nvecs))):
        b, n = bs[i % len(bs)], nvecs[i % len(nvecs)]["nvec"]
        cases.append((37, b - 1, min(2, b - 1), n if n % 2 else vec * n))
    return tuple(cases)


ROPE = "cuda/rope.cu"


def rope_lanes(d: int, path: str, elem_size: int = 2) -> int:
    """Lanes a token of rope_kernel<T, P>: P pairs a lane, P = 16 / sizeof(T)
    on the half-split vector path, half that interleaved, 1 scalar."""
    pairs = 16 // elem_size
    p = {"half": pairs, "interleaved": pairs // 2, "scalar": 1}[path]
    return d // 2 // p


def rope_tiles(d: int, path: str) -> dict[str, list]:
    """rope_kernel: kBlockLanes / lanes tokens share a block; the heads go
    over grid.y in head_groups (until kBusyLanes lanes are busy) and a
    block walks heads head_groups apart."""
    c = _c(ROPE)
    return {"tokens": [max(1, c("kBlockLanes") // rope_lanes(d, path)), "+"]}


def rope_head_groups(tokens: int, lanes: int, heads: int) -> int:
    c = _c(ROPE)
    busy = tokens * lanes
    return max(1, min(-(-c("kBusyLanes") // busy), heads, 65535))


@functools.lru_cache(maxsize=None)
def rope_design() -> tuple:
    """rope cases (tokens, Hq, Hkv, D, path): for each access path (16-byte
    half-split, 16-byte interleaved, scalar) and head dim the token counts
    hit the classes of tokens a block; two cases have so many tokens that
    each block walks several heads (total heads not a multiple of the head
    groups)."""
    cases = []
    for d in GPU_HEAD_DIMS:
        for i, path in enumerate(("half", "interleaved", "scalar")):
            t = rope_tiles(d, path)
            per = t["tokens"][0]
            toks = cover(t, [{"tokens": x} for x in range(1, 3 * per + 3)], cost=lambda v: v["tokens"] + 4)
            for j, v in enumerate(toks):
                hq, hkv = [(3, 1), (4, 4), (5, 1)][(i + j) % 3]
                cases.append((v["tokens"], hq, hkv, d, path))
    for d, path, hq, hkv in ((128, "scalar", 28, 5), (64, "half", 40, 7)):
        lanes = rope_lanes(d, path)
        tokens = next(t for t in range(64, 100000) if 1 < rope_head_groups(t, lanes, hq + hkv) < (hq + hkv) / 2
                      and (hq + hkv) % rope_head_groups(t, lanes, hq + hkv))
        cases.append((tokens, hq, hkv, d, path))
    return tuple(cases)


NORM_DTYPES = {"float32": 0, "bfloat16": 2}  # (float16 shares bfloat16's layouts)


@functools.lru_cache(maxsize=None)
def norm_layouts(dtype: str) -> dict[tuple, tuple]:
    """{(vec, items, tpr, rpb): (smallest, largest) hidden size} of the GPU norm
    kernels over 16-byte aligned rows, from the layout function the kernels
    launch with (common/norm.h through _core.norm_gpu_config)."""
    from mixkit import _core
    out = {}
    largest = 16384 if dtype == "float32" else 32768
    # Layouts change where a lane count or the items option crosses a power
    # of two: every width up to 1100, then the widths around each power of two.
    widths = set(range(1, 1100)) | {p + d for k in range(10, 16) for p in (1 << k,) for d in range(-17, 18)}
    for cols in sorted(w for w in widths if 1 <= w <= largest):
        try:
            cfg = _core.norm_gpu_config(NORM_DTYPES[dtype], cols, True)
        except ValueError:
            continue
        lo, hi = out.get(cfg, (cols, cols))
        out[cfg] = (min(lo, cols), max(hi, cols))
    return out


@functools.lru_cache(maxsize=None)
def norm_design() -> tuple:
    """Norm cases (dtype, rows, cols): every layout (vec, items, tpr, rpb) at
    its widest row, the lanes' last item full (the smallest widths are
    tests/test_norms.py's test_every_block_layout), with row counts that hit
    the classes of rows a block."""
    cases = []
    for dtype in NORM_DTYPES:
        by_rpb = {}
        for (vec, items, tpr, rpb), (lo, hi) in sorted(norm_layouts(dtype).items(), key=lambda kv: kv[1]):
            by_rpb.setdefault(rpb, []).append(hi)
        for rpb, widths in sorted(by_rpb.items()):
            rows = cover({"rows": [rpb, "+"]}, [{"rows": r} for r in range(1, 3 * rpb + 3)],
                         cost=lambda v: v["rows"] + 2)
            for i in range(max(len(rows), len(widths))):
                cases.append((dtype, rows[i % len(rows)]["rows"], widths[i % len(widths)]))
    return tuple(cases)


def append_tiles() -> dict[str, list]:
    """kv_cache_append_kernel: a block per (sequence, token), its threads (a
    multiple of 32, at most kAppendThreads) over the token's KV heads x
    vectors (per_token); only the last C tokens of a call are written."""
    c = _c(DECODE)
    return {"per_token": [(c("kAppendThreads"), 32), "+"]}


@functools.lru_cache(maxsize=None)
def append_design() -> tuple:
    """kv_cache_append cases (Hkv, D, vector, C, tokens): KV heads x vectors a
    token at the thread-count boundaries, on the 16-byte path (bfloat16,
    8-element vectors) and the scalar one; tokens a call below, at and past
    the capacity (excess = tokens - C)."""
    cands = []
    for hkv in range(1, 300):
        for d in (8, 16, 64, 128, 1, 3):  # odd head dims: the scalar path
            for vec in (True, False) if d % 8 == 0 else (False,):
                cands.append({"hkv": hkv, "d": d, "vec": vec, "per_token": hkv * d // (8 if vec else 1)})
    chosen = cover({"per_token": append_tiles()["per_token"]}, cands, cost=lambda v: v["per_token"] + 64)
    cases = []
    for i, v in enumerate(chosen):
        cap = 5 + i
        tokens = cap + [-1, 0, 1, 2, cap + 1][i % 5]
        cases.append((v["hkv"], v["d"], v["vec"], cap, tokens))
    return tuple(cases)


# ---- which tests run each kernel file -------------------------------------------------
# tests/test_tiles.py checks that every kernel file of csrc/cuda is here and
# that its designs above cover its tiles; tools/mutation_sweep.py runs a
# file's `tests` (pytest arguments, the emulated GPU's cases) against each
# mutant of it, on the emulated GPU of each warp width in `warps`.

class Kernel:
    def __init__(self, warps, *tests):
        self.warps, self.tests = tuple(warps), tuple(tests)


def _fns(path, *names):
    return tuple(f"{path}::{n}" for n in names)


# The tile-boundary tests first: a mutant that a boundary catches stops
# there. (The sweep's budget is a survivor's full run: the slow long-sequence
# and per-case reference tests, whose shapes the tile designs cover, are
# left to CI.)
_FA = _fns("tests/test_flash_attn.py", "test_tile_boundaries", "test_max_seqlen_hints_below_the_real_lengths",
           "test_varlen_matches_per_sequence_reference", "test_window_convention_on_device",
           "test_deterministic_backward")
_DEC = _fns("tests/test_decode.py", "test_tile_boundaries", "test_append_tile_boundaries",
            "test_decode_attn_matches_reference", "test_paged_decode_equals_ring_decode",
            "test_prefill_then_token_by_token_decode", "test_append_writes_slot_p_mod_c")
_MLP = _fns("tests/test_moe_mlp.py", "test_tile_boundaries", "test_grouped_gemm_matches_per_expert_matmul",
            "test_grouped_swiglu_matches_float32_reference", "test_gpu_wgrad_large_experts_match_cpu",
            "test_moe_mlp_forward_and_gradients")
_ROUTE = ("tests/test_moe_route.py",)
KERNELS = {
    # On the warp-32 emulated GPU (an H100) the default forward is sm_90a's;
    # the sm_80 one runs where a test forces it.
    # float16 runs the same code as bfloat16 there (only the mma's type differs).
    "cuda/flash_attn_fwd_sm80.cuh": Kernel((32,), *_FA, "-k", "emu and sm80 and not float16"),
    "cuda/flash_attn_fwd_sm90.cuh": Kernel((32,), *_FA, "tests/test_prefill.py", "-k",
                                           "emu and not sm80 and not float16"),
    "cuda/flash_attn_bwd_sm80.cuh": Kernel((32,), *_FA, "-k", "emu and not float16"),
    "cuda/flash_attn.cuh": Kernel((32,), *_FA, "-k", "emu and not float16"),
    "cuda/flash_attn.cu": Kernel((32, 64), *_FA, "-k", "emu"),
    "cuda/flash_attn_fwd_mfma.cuh": Kernel((64,), *_FA, "tests/test_mfma_attention.py", "-k", "emu or not cpu"),
    "cuda/flash_attn_bwd_mfma.cuh": Kernel((64,), *_FA, "tests/test_mfma_attention_bwd.py", "-k", "emu or not cpu"),
    "cuda/decode.cu": Kernel((32, 64), *_DEC, "tests/test_prefill.py", "-k", "emu"),
    "cuda/grouped_gemm.cu": Kernel((32, 64), *_MLP, "-k", "emu"),
    "cuda/grouped_gemm_sm90.cuh": Kernel((32,), *_MLP, "-k", "emu and not sm80"),
    "cuda/grouped_gemm_mfma.cuh": Kernel((64,), *_MLP, "tests/test_mfma_layout.py", "-k", "emu or not cpu"),
    "cuda/moe_route.cu": Kernel((32, 64), *_ROUTE, "-k", "emu"),
    "cuda/norm.cu": Kernel((32, 64), "tests/test_norms.py", "-k", "emu"),
    "cuda/rope.cu": Kernel((32, 64), "tests/test_rope.py", "-k", "emu"),
    "cuda/paged.cu": Kernel((32, 64), "tests/test_paged.py", "-k", "emu"),
}
# Not kernels: the emulator (tests/test_emu*.py), the portability layer and
# the instruction wrappers, each held to an independent model of its
# instruction by tests/test_emu_sm80.py, test_emu_wgmma.py, test_emu_mfma.py
# and test_mfma_layout.py.
NOT_KERNELS = {"cuda/compat.cuh", "cuda/mma_sm80.cuh", "cuda/wgmma_sm90.cuh", "cuda/mfma.cuh"}


def prefill_design() -> tuple:
    """Chunked-prefill cases (B, H, Hkv, D, W, C, prompt, total): chunks of W
    tokens one under and one over the largest query tile (the chunk is the
    attention's Sq, the cached tail its Sk - Sq), a capacity above the window
    and a prompt that is one chunk without a window; a few decode steps
    after."""
    rows = max(_size(t) for k in FLASH_KERNELS for t in flash_attn_tiles(k, 64)["sq"] if t != "+")
    return ((1, 2, 1, 64, rows - 1, rows - 1, 2 * (rows - 1) + 2, 2 * (rows - 1) + 5),
            (1, 2, 1, 128, rows + 1, rows + 33, 2 * rows + 4, 2 * rows + 7),
            (1, 3, 1, 64, None, rows + 72, rows + 2, rows + 5))


PAGED = "cuda/paged.cu"


def paged_tiles(warp: int, page_size: int) -> dict[str, list]:
    """paged_prefill_attn_kernel: R query rows (query x head of the GQA group)
    a block, dealt to the warps in turn; keys in tiles of BN = one a lane
    (the warp width), from the first row's window start; positions reach
    their page through the block table in pages of page_size."""
    c = functools.partial(constant, PAGED, kWarpSize=warp)
    return {"rows": [c("R"), "+"], "sk": [c("BN"), "+"], "off": [c("BN"), "-"], "page": [page_size]}


@functools.lru_cache(maxsize=None)
def paged_design() -> tuple:
    """paged_prefill_attn cases (H, Hkv, D, page_size, window, ((Sq, Sk), ...)):
    every GPU head dim, GQA groups 1, 3 and 4, with and without a window;
    each case's sequences hit the classes of the rows a block (odd groups:
    rows = Sq x group), of Sk and Sk - Sq against the key tile of both warp
    widths, and of Sk against the page size."""
    cases = [(4, 4, 64, 16, None), (6, 2, 128, 5, 40), (8, 2, 256, 8, None), (3, 1, 64, 3, 33),
             (4, 1, 128, 16, 70)]
    cands = []
    tiles_of = {}
    for i, (h, hkv, d, ps, w) in enumerate(cases):
        group = h // hkv
        t = merge(*(paged_tiles(w_, ps) for w_ in WARPS))
        if group % 2 == 0:  # rows = Sq x group: an even group reaches only even residues
            del t["rows"]
        tiles_of[i] = t
        for sq in range(1, 40):
            for sk in range(1, 200):
                if sq * group <= 3 * constant(PAGED, "R", kWarpSize=32) + 3:
                    cands.append({"case": i, "rows": sq * group, "sk": sk, "off": sk - sq, "page": sk, "sq": sq})
    chosen = []
    for i in range(len(cases)):
        mine = [v for v in cands if v["case"] == i]
        chosen += cover(tiles_of[i], mine, seed=i, cost=lambda v: (1 + v["rows"] // 16) * (1 + v["sk"] // 32))
    return tuple((h, hkv, d, ps, w, tuple((v["sq"], v["sk"]) for v in chosen if v["case"] == i) + ((0, 5),))
                 for i, (h, hkv, d, ps, w) in enumerate(cases))
