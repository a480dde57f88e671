"""Pairwise prompt design: combine per-class options so every pair of options appears in a prompt.

The options of the contextual dimensions are combined by a strength-2 covering array: for any
two dimensions, every pair of their options appears in at least one row (= one prompt). The
lower bound on the rows is the product of the two largest option counts, and it is reached by
orthogonal arrays OA(n^2, k, n, 2), which exist for the paper's shapes:

* prime powers q: the classic construction over GF(q), up to q + 1 dimensions;
* products: OA(a^2, k, a) x OA(b^2, k, b) -> OA((ab)^2, k, ab), so 15 = 3 x 5 -> 225 rows for
  15^4 and 30 = 3 x 10 -> 900 rows for 30^4 (order 10 from a pair of orthogonal Latin squares);
* any order with 3 dimensions (a Latin square), any order with 2 (all combinations).

Other shapes (mixed option counts, more dimensions than an OA of that order has) use the
smallest OA that fits, folded onto the real sizes with redundant rows dropped, or a seeded
AETG-style greedy design, whichever is smaller. `verify_pairwise` proves coverage of the result.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from functools import lru_cache
from pathlib import Path

from zsd.errors import ZsdError, write_atomic

Row = tuple[int, ...]


# --- finite fields and orthogonal arrays -----------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with p**m == q for prime p, else None."""
    for p in range(2, q + 1):
        if q % p == 0:
            m = 0
            while q % p == 0:
                q //= p
                m += 1
            return (p, m) if q == 1 else None
    return None


@lru_cache(maxsize=None)
def galois_field(q: int) -> tuple[list[list[int]], list[list[int]]]:
    """Addition and multiplication tables of GF(q); element x stands for the polynomial whose
    coefficients are the base-p digits of x, reduced modulo the first irreducible modulus found."""
    p, m = _prime_power(q)

    def digits(x):
        return [(x // p**i) % p for i in range(m)]

    def number(coeffs):
        return sum(c * p**i for i, c in enumerate(coeffs))

    add = [[number([(a + b) % p for a, b in zip(digits(x), digits(y))]) for y in range(q)] for x in range(q)]
    for low in range(q):  # monic modulus x^m + (low's digits); first one giving a field wins
        modulus = digits(low)

        def mul(x, y):
            prod = [0] * (2 * m - 1)
            for i, a in enumerate(digits(x)):
                for j, b in enumerate(digits(y)):
                    prod[i + j] = (prod[i + j] + a * b) % p
            for deg in range(2 * m - 2, m - 1, -1):  # x^deg = -x^(deg-m) * modulus-tail
                c, prod[deg] = prod[deg], 0
                for i in range(m):
                    prod[deg - m + i] = (prod[deg - m + i] - c * modulus[i]) % p
            return number(prod[:m])

        table = [[mul(x, y) for y in range(q)] for x in range(q)]
        # a field iff every nonzero element's row is a permutation (no zero divisors)
        if all(sorted(table[x]) == list(range(q)) for x in range(1, q)):
            return add, table
    raise AssertionError(f"no irreducible polynomial found for GF({q})")


# A pair of orthogonal Latin squares of order 10 (found once by an exact-cover search over the
# transversals of a random Latin square); tests re-verify orthogonality. Groups of order 10
# have no transversals, so unlike the prime-power case there is no short formula for these.
_MOLS10 = (
    ("2160789543", "1809562734", "5614023897", "6723951408", "7346890152",
     "4957318620", "9035674281", "8471235069", "0298146375", "3582407916"),
    ("0123456789", "2670348915", "1837690452", "7314985620", "6245831097",
     "9708562134", "4962013578", "3059274861", "5481729306", "8596107243"),
)


@lru_cache(maxsize=None)
def orthogonal_array(n: int, k: int) -> tuple[Row, ...] | None:
    """OA(n^2, k, n, 2): n^2 rows over k columns, every pair of columns shows every pair of
    symbols exactly once. None if zsd knows no construction for (n, k)."""
    if k <= 2:
        return tuple(itertools.product(range(n), repeat=k))
    if k == 3:  # the cyclic Latin square exists for every order
        return tuple((a, b, (a + b) % n) for a in range(n) for b in range(n))
    if _prime_power(n) and k <= n + 1:
        add, mul = galois_field(n)
        # columns: a, then a*x + b for every field element x
        return tuple(tuple([a] + [add[mul[a][x]][b] for x in range(n)])[:k] for a in range(n) for b in range(n))
    if n == 10 and k <= 4:
        first, second = _MOLS10
        return tuple((r, c, int(first[r][c]), int(second[r][c]))[:k] for r in range(10) for c in range(10))
    for a in range(2, n):
        if n % a == 0:
            left, right = orthogonal_array(a, k), orthogonal_array(n // a, k)
            if left and right:  # symbol pairs (x, y) -> x * b + y
                b = n // a
                return tuple(tuple(x * b + y for x, y in zip(ra, rb)) for ra in left for rb in right)
    return None


# --- covering arrays ------------------------------------------------------------------------


def verify_pairwise(rows, sizes) -> list[tuple[int, int, int, int]]:
    """The (dimension i, option a, dimension j, option b) pairs, i < j, that no row covers."""
    k = len(sizes)
    for row in rows:
        if len(row) != k or any(not 0 <= v < s for v, s in zip(row, sizes)):
            raise ValueError(f"row {row} does not fit option counts {tuple(sizes)}")
    missing = []
    for i, j in itertools.combinations(range(k), 2):
        seen = {(row[i], row[j]) for row in rows}
        missing += [(i, a, j, b) for a in range(sizes[i]) for b in range(sizes[j]) if (a, b) not in seen]
    return missing


def lower_bound(sizes) -> int:
    top = sorted(sizes, reverse=True)
    return top[0] * top[1] if len(top) > 1 else top[0]


def covering_array(sizes, seed: int = 0) -> list[Row]:
    """A small strength-2 covering array for the given option counts, deterministic for `seed`."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"option counts must be positive, got {sizes}")
    if len(sizes) == 1:
        return [(a,) for a in range(sizes[0])]
    folded = _folded_orthogonal_array(sizes)
    if folded and len(folded) == lower_bound(sizes):
        return folded
    greedy = greedy_covering_array(sizes, seed)
    return folded if folded and len(folded) <= len(greedy) else greedy


def _folded_orthogonal_array(sizes) -> list[Row] | None:
    """The smallest known OA(n^2, k, n, 2) with n >= every size, cut down to `sizes`."""
    k, n = len(sizes), max(sizes)
    while orthogonal_array(n, k) is None:
        n += 1  # terminates: prime powers q with q + 1 >= k always have one
    if n * n > 4 * lower_bound(sizes):
        return None  # many dimensions with few options: greedy is far better, skip the huge OA
    # Symbols beyond a dimension's size become wildcards; a row whose real pairs all appear
    # elsewhere is redundant. Wildcards left over are filled with the rarest option (balance).
    rows = [[v if v < s else None for v, s in zip(row, sizes)] for row in orthogonal_array(n, k)]
    return _fill_wildcards(_drop_redundant(rows), sizes)


def _pairs(row):
    return [(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)
            if row[i] is not None and row[j] is not None]


def _drop_redundant(rows):
    count: dict[tuple, int] = {}
    for row in rows:
        for pair in _pairs(row):
            count[pair] = count.get(pair, 0) + 1
    kept = []
    for row in reversed(rows):
        pairs = _pairs(row)
        if all(count[p] > 1 for p in pairs):
            for p in pairs:
                count[p] -= 1
        else:
            kept.append(row)
    return kept[::-1]


def _fill_wildcards(rows, sizes) -> list[Row]:
    used = [[0] * s for s in sizes]
    for row in rows:
        for d, v in enumerate(row):
            if v is not None:
                used[d][v] += 1
    filled = []
    for row in rows:
        row = list(row)
        for d, v in enumerate(row):
            if v is None:
                row[d] = min(range(sizes[d]), key=lambda a: used[d][a])
                used[d][row[d]] += 1
        filled.append(tuple(row))
    return filled


def greedy_covering_array(sizes, seed: int = 0, candidates: int = 24) -> list[Row]:
    """AETG-style greedy: each new row is the best of `candidates` rows that start from a random
    uncovered pair of the least covered dimension pair and fill the other dimensions, in random order, with the option covering the
    most uncovered pairs (ties: the option used least so far, so options stay balanced)."""
    rng = random.Random(seed)
    k = len(sizes)
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(k), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}
    used = [[0] * s for s in sizes]
    rows = []

    def gain(row, d, v):
        return sum(((d, v, e, row[e]) if d < e else (e, row[e], d, v)) in uncovered
                   for e in range(k) if e != d and row[e] is not None)

    while uncovered:
        # start from the dimension pair with the most uncovered pairs: the two largest dimensions
        # first, whose full product is the lower bound every other pair must fit into
        per_pair: dict[tuple[int, int], list] = {}
        for p in sorted(uncovered):
            per_pair.setdefault((p[0], p[2]), []).append(p)
        pending = max(per_pair.values(), key=len)
        best, best_gain = None, -1
        for _ in range(candidates):
            i, a, j, b = rng.choice(pending)
            row: list = [None] * k
            row[i], row[j] = a, b
            for d in rng.sample([d for d in range(k) if d not in (i, j)], k - 2):
                row[d] = max(range(sizes[d]), key=lambda v: (gain(row, d, v), -used[d][v], rng.random()))
            total = sum(p in uncovered for p in _pairs(row))
            if total > best_gain:
                best, best_gain = tuple(row), total
        rows.append(best)
        uncovered.difference_update(_pairs(best))
        for d, v in enumerate(best):
            used[d][v] += 1
    return _fill_wildcards(_drop_redundant([list(r) for r in rows]), sizes)


# --- prompt strings (compel syntax) -----------------------------------------------------------

_A1111 = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\)")
_TRAILING_SIGN = re.compile(r"(?<=\w)([+-]+)(?=\s|,|$)")


def _escape(text: str) -> str:
    # compel reads '(' ')' as grouping and a trailing '+'/'-' on a word as up/down-weighting
    text = text.replace("\\", "").replace("(", r"\(").replace(")", r"\)")
    return _TRAILING_SIGN.sub(r" \1", text)


def to_compel(text: str) -> str:
    """Option text -> compel syntax: literal parentheses escaped, A1111 '(text:1.2)' converted."""
    out, last = [], 0
    for match in _A1111.finditer(text):
        out.append(_escape(text[last:match.start()]))
        out.append(weighted(match.group(1), float(match.group(2))))
        last = match.end()
    out.append(_escape(text[last:]))
    return "".join(out)


def weighted(text: str, weight: float) -> str:
    """compel's '(text)1.2' with the text escaped; weight 1 is plain text."""
    text = _escape(text.strip())
    return text if weight == 1.0 else f"({text}){weight:g}"


def clean_option(text: str) -> str:
    """Option text as it goes into a prompt: whitespace (LLM line breaks, tabs) collapsed."""
    return " ".join(text.split())


def build_prompts(options, recipe=None, seed: int = 0) -> list[dict]:
    """One prompt per covering-array row per class, in class order.

    `options` is a loaded options file (zsd.options.Options); `recipe` supplies class order,
    dimensions and weights; without it the options file defines them and every weight is 1.
    Each class gets its own seeded relabelling of every dimension's options and its own row
    order, so classes see different combinations. Prompt i gets image seed `seed + i`.
    """
    if recipe is not None:
        missing = [c for c in recipe.classes if c not in options.classes]
        if missing:
            raise ZsdError(f"The options file has no entry for class {missing[0]!r} of recipe {recipe.name!r} "
                           f"({len(missing)} missing); run `zsd options {recipe.name}` or add them.")
        classes = list(recipe.classes)
        dims = [(d.key, d.weight) for d in recipe.contextual]
        superclass_weight = recipe.superclass.weight if recipe.superclass else None
        classname_weight, domain, prefix = recipe.classname_weight, recipe.domain, recipe.prompt_prefix
    else:
        classes = list(options.classes)
        dims = [(key, 1.0) for key in options.dimensions if key != "superclass"]
        superclass_weight = 1.0 if "superclass" in options.dimensions else None
        classname_weight, domain, prefix = 1.0, None, "A photo of a"

    prompts = []
    for label, name in enumerate(classes):
        entry = options.classes[name]
        for key, _ in dims + ([("superclass", 0)] if superclass_weight is not None else []):
            if not entry.get(key):
                raise ZsdError(f"The options file has no {key!r} options for class {name!r}; add them or rerun `zsd options`.")
        sizes = [len(entry[key]) for key, _ in dims]
        rng = random.Random(f"{seed}/{label}")
        relabel = [rng.sample(range(s), s) for s in sizes]
        rows = [tuple(relabel[d][v] for d, v in enumerate(row)) for row in covering_array(sizes, seed)]
        rng.shuffle(rows)
        superclasses = entry.get("superclass", [])
        superclass_order = rng.sample(range(len(superclasses)), len(superclasses))

        head = f"{prefix} {weighted(clean_option(name), classname_weight)}"
        for r, row in enumerate(rows):
            chosen = {key: v for (key, _), v in zip(dims, row)}
            text = head
            if superclass_weight is not None:
                s = superclass_order[r % len(superclasses)]  # superclasses rotate, balanced
                chosen = {"superclass": s, **chosen}
                inside = ", ".join(x for x in (clean_option(superclasses[s]), domain) if x)
                text += " " + weighted(f"({inside})", superclass_weight)
            parts = [text] + [_weighted_option(entry[key][v], w) for (key, w), v in zip(dims, row)]
            prompts.append({"class": name, "label": label, "prompt": ", ".join(parts),
                            "options": chosen, "seed": seed + len(prompts)})
    return prompts


def _weighted_option(text: str, weight: float) -> str:
    text = clean_option(text)
    if _A1111.search(text):  # the option carries its own weights; keep them, don't nest
        return to_compel(text)
    return weighted(text, weight)


def write_prompts(prompts: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))


def read_prompts(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise ZsdError(f"Prompt file {path} does not exist; create it with `zsd prompts`.")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError:
            raise ZsdError(f"{path}:{n} is not a JSON line; regenerate the file with `zsd prompts`.") from None
        if not {"class", "label", "prompt", "seed"} <= set(p):
            raise ZsdError(f"{path}:{n} lacks one of the keys class, label, prompt, seed; regenerate it with `zsd prompts`.")
        prompts.append(p)
    return prompts
