import itertools
import json
import random

import pytest

from zsd.cli import main
from zsd.errors import ZsdError
from zsd.options import Options
from zsd.prompts import (build_prompts, covering_array, galois_field, greedy_covering_array, lower_bound,
                         orthogonal_array, to_compel, verify_pairwise, weighted)
from zsd.recipes import recipe_from_dict


def _is_orthogonal_array(rows, n, k):
    return len(rows) == n * n and all(
        len({(r[i], r[j]) for r in rows}) == n * n for i, j in itertools.combinations(range(k), 2))


@pytest.mark.parametrize("q", [2, 3, 4, 5, 7, 8, 9, 16, 25, 27])
def test_galois_fields_satisfy_the_field_axioms(q):
    add, mul = galois_field(q)
    elems = range(q)
    assert all(add[a][0] == a and mul[a][1] == a for a in elems)
    assert all(sorted(add[a]) == list(elems) for a in elems)
    assert all(sorted(mul[a]) == list(elems) for a in range(1, q))  # inverses exist
    for a, b, c in random.Random(q).sample(list(itertools.product(elems, repeat=3)), min(q**3, 300)):
        assert mul[a][add[b][c]] == add[mul[a][b]][mul[a][c]]
        assert mul[mul[a][b]][c] == mul[a][mul[b][c]]


@pytest.mark.parametrize("n,k", [(4, 5), (5, 6), (8, 9), (9, 10), (10, 4), (15, 4), (30, 4), (16, 17), (6, 3), (12, 4)])
def test_orthogonal_arrays_are_orthogonal(n, k):
    assert _is_orthogonal_array(orthogonal_array(n, k), n, k)


def test_no_orthogonal_array_is_claimed_where_none_is_known():
    assert orthogonal_array(6, 4) is None  # no pair of orthogonal Latin squares of order 6 exists
    assert orthogonal_array(15, 5) is None  # the 3 x 5 product is limited to 4 columns


@pytest.mark.parametrize("sizes,rows", [((15,) * 4, 225), ((30,) * 4, 900), ((10,) * 4, 100), ((12, 12, 12), 144)])
def test_paper_shapes_reach_the_lower_bound(sizes, rows):
    ca = covering_array(sizes)
    assert len(ca) == rows == lower_bound(sizes)
    assert verify_pairwise(ca, sizes) == []


@pytest.mark.parametrize("sizes,at_most", [((15,) * 5, 256), ((15, 12, 10, 8), 180)])
def test_other_shapes_match_or_beat_allpairspy(sizes, at_most):
    # allpairspy: 15^5 -> 288 rows, (15, 12, 10, 8) -> 180 rows (tools/bench_prompts.py)
    ca = covering_array(sizes)
    assert len(ca) <= at_most and verify_pairwise(ca, sizes) == []


SHAPES = [tuple(random.Random(i).randint(2, 12) for _ in range(random.Random(-i).randint(2, 6))) for i in range(40)]


@pytest.mark.parametrize("sizes", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_covering_arrays_cover_every_pair(sizes):
    ca = covering_array(sizes, seed=1)
    assert verify_pairwise(ca, sizes) == []
    assert lower_bound(sizes) <= len(ca) <= 2 * lower_bound(sizes) + 10


def test_greedy_is_deterministic_for_a_seed():
    assert greedy_covering_array((5, 4, 3, 3), seed=3) == greedy_covering_array((5, 4, 3, 3), seed=3)
    assert greedy_covering_array((5, 4, 3, 3), seed=3) != greedy_covering_array((5, 4, 3, 3), seed=4)


def test_verifier_finds_a_removed_row():
    ca = covering_array((5, 5, 5))
    assert verify_pairwise(ca[1:], (5, 5, 5)) == [(0, ca[0][0], 1, ca[0][1]), (0, ca[0][0], 2, ca[0][2]),
                                                  (1, ca[0][1], 2, ca[0][2])]
    with pytest.raises(ValueError):
        verify_pairwise([(0, 5, 0)], (5, 5, 5))


# --- prompt strings ---------------------------------------------------------------------------

def test_weights_are_written_in_compel_syntax():
    assert weighted("keeshond", 1.5) == "(keeshond)1.5"
    assert weighted("10:00 AM", 1.0) == "10:00 AM"
    assert weighted("(Dog, pet)", 1.2) == r"(\(Dog, pet\))1.2"
    assert to_compel("a (red:1.3) ball (big)") == r"a (red)1.3 ball \(big\)"
    assert to_compel("hand-made, well- done") == "hand-made, well - done"


def test_prompt_strings_parse_with_compel_as_intended():
    compel = pytest.importorskip("compel.prompt_parser")
    text = ", ".join([f"A photo of a {weighted('keeshond', 1.5)} {weighted('(Dog, pet)', 1.2)}",
                      weighted("A cozy room, with a couch (and a fireplace).", 0.1), to_compel("around 1-2pm (warm:1.3)")])
    fragments = compel.PromptParser().parse_conjunction(text).prompts[0].children
    weights = {f.text.replace(" ", ""): round(f.weight, 3) for f in fragments}
    assert weights["keeshond"] == 1.5
    assert weights["(Dog,pet)"] == 1.2
    assert weights["Acozyroom,withacouch(andafireplace)."] == 0.1
    assert weights["warm"] == 1.3


def _options(classes, sizes, superclasses=2):
    return Options({c: {"superclass": [f"{c}-super{i}" for i in range(superclasses)],
                        **{dim: [f"{c}-{dim}-{i}" for i in range(s)] for dim, s in sizes.items()}} for c in classes})


RECIPE = recipe_from_dict({"name": "pets", "domain": "pet", "classname_weight": 1.5,
                           "classes": ["keeshond", "persian"],
                           "dimensions": [{"key": "superclass", "weight": 1.2}, {"key": "location"},
                                          {"key": "daytime", "weight": 0.1}, {"key": "position"}]})


def test_prompts_cover_all_option_pairs_per_class_with_distinct_seeds():
    opts = _options(["persian", "keeshond"], {"location": 5, "daytime": 4, "position": 3})
    prompts = build_prompts(opts, RECIPE, seed=100)
    assert [p["seed"] for p in prompts] == list(range(100, 100 + len(prompts)))
    for label, name in enumerate(RECIPE.classes):  # recipe order, not options-file order
        mine = [p for p in prompts if p["label"] == label]
        assert {p["class"] for p in mine} == {name} and len(mine) == 20
        rows = [(p["options"]["location"], p["options"]["daytime"], p["options"]["position"]) for p in mine]
        assert verify_pairwise(rows, (5, 4, 3)) == []
        assert sorted({p["options"]["superclass"] for p in mine}) == [0, 1]
    p = prompts[0]
    o = p["options"]
    assert p["prompt"] == (f"A photo of a (keeshond)1.5 (\\(keeshond-super{o['superclass']}, pet\\))1.2, "
                           f"keeshond-location-{o['location']}, (keeshond-daytime-{o['daytime']})0.1, "
                           f"keeshond-position-{o['position']}")


def test_classes_get_different_combinations_and_a_seed_reproduces_them():
    opts = Options({c: {"location": list("abcde"), "daytime": list("abcd")} for c in ("x", "y")})
    first = build_prompts(opts, seed=0)
    assert build_prompts(opts, seed=0) == first
    combos = [[tuple(p["options"].values()) for p in first if p["class"] == c] for c in ("x", "y")]
    assert combos[0] != combos[1] and sorted(combos[0]) == sorted(combos[1])  # both full, differently ordered
    assert build_prompts(opts, seed=1) != first


def test_without_recipe_the_options_file_defines_classes_and_all_weights_are_one():
    prompts = build_prompts(_options(["b", "a"], {"location": 3, "color": 3}))
    assert [p["class"] for p in prompts[:1] + prompts[-1:]] == ["b", "a"]
    assert all("(" not in p["prompt"].replace("\\(", "") for p in prompts)


def test_missing_class_in_options_file_is_one_clear_error():
    with pytest.raises(ZsdError, match="no entry for class 'persian'"):
        build_prompts(_options(["keeshond"], {"location": 3, "daytime": 3, "position": 3}), RECIPE)


def test_prompts_command_writes_json_lines(tmp_path):
    opts = tmp_path / "options.json"
    opts.write_text(json.dumps({"classes": _options(["cat", "dog"], {"location": 4, "daytime": 4}).classes}))
    main(["prompts", "--options", str(opts), "--out", str(tmp_path / "p.jsonl"), "--seed", "7"])
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 32 and lines[0]["seed"] == 7
    assert set(lines[0]) == {"class", "label", "prompt", "options", "seed"}
