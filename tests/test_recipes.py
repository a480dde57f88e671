import json

import pytest

from zsd.errors import ZsdError
from zsd.recipes import load_recipe, recipe_from_dict, recipe_names

# (recipe, classes, class-name weight, {dimension: weight}, options per dimension): Table 7 of the paper
TABLE_7 = [
    ("pets", 37, 1.5, {"superclass": 1.2, "location": 1, "position": 1, "daytime": 1, "camera_angle": 1}, 15),
    ("flowers", 102, 1.2, {"superclass": 1, "color": 1, "location": 1, "daytime": 0.1, "camera_angle": 0.1}, 15),
    ("cars", 196, 1.0, {"superclass": 1, "location": 1, "color": 1, "daytime": 1, "camera_angle": 1}, 15),
    ("food", 101, 1.2, {"superclass": 1, "location": 1, "way_of_serving": 1.5, "daytime": 0.1, "camera_angle": 0.1}, 30),
    ("textures", 47, 1.5, {"superclass": 1.2, "color": 1, "daytime": 0.1, "camera_angle": 0.1, "location": 0.1}, 15),
    ("aircraft", 100, 1.5, {"superclass": 0.1, "location": 1, "position": 1, "daytime": 1, "camera_angle": 1}, 15),
    ("imagenet100", 100, 1.2, {"superclass": 1.2, "location": 1, "position": 1, "daytime": 1, "camera_angle": 1}, 30),
]


@pytest.mark.parametrize("name,n_classes,cw,dims,n", TABLE_7)
def test_shipped_recipes_match_table_7(name, n_classes, cw, dims, n):
    r = load_recipe(name)
    assert len(r.classes) == n_classes == len({c.lower() for c in r.classes})
    assert r.classname_weight == cw and r.options_per_dimension == n
    assert {d.key: d.weight for d in r.dimensions} == dims
    assert all("{c}" in t for t in r.templates)


def test_every_shipped_recipe_is_in_the_table():
    assert sorted(recipe_names()) == sorted(row[0] for row in TABLE_7)


def test_pets_labels_follow_the_dataset_order_not_sorted_folder_order():
    pets = load_recipe("pets")
    assert pets.classes[:3] == ("Abyssinian", "American Bulldog", "American Pit Bull Terrier")
    assert pets.label_of("american_bulldog") == 1 and pets.label_of("Sphynx") == 33
    assert load_recipe("imagenet100").label_of(load_recipe("imagenet100").folders[5]) == 5
    flowers = load_recipe("flowers")  # Oxford folder names where CLIP renamed the class
    assert flowers.classes[flowers.label_of("ball_moss")] == "air plant"
    assert flowers.label_of("pink_primrose") == 0
    with pytest.raises(ZsdError, match="matches no class"):
        pets.label_of("zebra")


def test_recipe_loads_from_a_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "classes": ["a", "b"],
                                "dimensions": [{"key": "location"}, {"key": "daytime", "weight": 0.5}]}))
    r = load_recipe(path)
    assert r.classes == ("a", "b") and r.superclass is None and r.contextual[1].weight == 0.5


def _recipe(**changes):
    data = {"name": "x", "classes": ["cat", "dog"],
            "dimensions": [{"key": "superclass"}, {"key": "location"}, {"key": "daytime"}]}
    data.update(changes)
    return data


@pytest.mark.parametrize("changes,message", [
    ({"dimensions": [{"key": "locaton"}, {"key": "daytime"}]}, "unknown dimension 'locaton'"),
    ({"dimensions": [{"key": "location", "weight": "high"}, {"key": "daytime"}]}, "weight of dimension 'location' must be a non-negative number"),
    ({"classname_weight": None}, "'classname_weight' must be a non-negative number"),
    ({"classes": ["cat", "Dog", "dog"]}, "duplicate class 'dog'"),
    ({"dimensions": [{"key": "location"}, {"key": "location"}]}, "listed twice"),
    ({"dimensions": [{"key": "superclass"}, {"key": "location"}]}, "at least two contextual"),
    ({"templates": ["a photo"]}, "containing '{c}'"),
    ({"colour": 1}, "unknown field"),
])
def test_invalid_recipes_fail_with_one_clear_sentence(changes, message):
    with pytest.raises(ZsdError, match=message.replace("(", r"\(").replace("{", r"\{")):
        recipe_from_dict(_recipe(**changes))


def test_a_custom_dimension_needs_its_own_question():
    r = recipe_from_dict(_recipe(dimensions=[{"key": "weather", "question": "List {n} weathers for {subject}."},
                                             {"key": "daytime"}], domain="pet"))
    assert r.contextual[0].question_for(r.subject("cat"), 4) == "List 4 weathers for a cat (a pet)."


def test_unknown_recipe_name_lists_the_known_ones():
    with pytest.raises(ZsdError, match="pets"):
        load_recipe("petz")
