"""Recipes: one JSON file per target domain describing how to synthesise its training images.

A recipe names the classes (in label order), the contextual dimensions an LLM is asked about,
the prompt weight of each dimension and of the class name (the paper's Table 7), and the
zero-shot templates `zsd eval` uses. Data files live in `zsd/data/recipes/` (package data, so a
wheel install has them); `load_recipe("pets")` resolves a bare name there, anything else is read as a path.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from zsd.errors import ZsdError
from zsd.sources import class_key

RECIPES_DIR = Path(__file__).resolve().parent / "data" / "recipes"

# The contextual dimensions zsd knows how to ask an LLM about. A recipe may use another key
# only if it brings its own `question`; otherwise a typo ("locaton") would silently produce
# a useless LLM request, so it is rejected on load.
DIMENSION_QUESTIONS = {
    "superclass": "Name {n} different superclasses or broader categories that {subject} belongs to (one or two words each).",
    "location": "List {n} different locations or backgrounds where a photo of {subject} could be taken.",
    "position": "List {n} different poses or positions of {subject} in a photo.",
    "daytime": "List {n} different times of day at which a photo of {subject} could be taken.",
    "camera_angle": "List {n} different camera angles from which {subject} could be photographed.",
    "color": "List {n} different colors that {subject} can have.",
    "way_of_serving": "List {n} different ways of serving {subject}.",
}

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Dimension:
    key: str
    weight: float = 1.0
    question: str | None = None  # overrides DIMENSION_QUESTIONS[key]; "{n}" and "{subject}" are filled in

    def question_for(self, subject: str, n: int) -> str:
        template = self.question or DIMENSION_QUESTIONS[self.key]
        return template.format(n=n, subject=subject)


@dataclass(frozen=True)
class Recipe:
    name: str
    classes: tuple[str, ...]
    dimensions: tuple[Dimension, ...]  # "superclass" (if present) plus the contextual dimensions
    classname_weight: float = 1.0
    options_per_dimension: int = 15
    domain: str | None = None  # "pet": shown next to the superclass, "(Dog, pet)", and in LLM questions
    prompt_prefix: str = "A photo of a"
    templates: tuple[str, ...] = ("a photo of a {c}.",)
    folders: tuple[str, ...] | None = None  # dataset folder names parallel to classes, if not derivable
    description: str = ""

    @property
    def contextual(self) -> tuple[Dimension, ...]:
        """The dimensions combined by the covering array (everything but the superclass)."""
        return tuple(d for d in self.dimensions if d.key != "superclass")

    @property
    def superclass(self) -> Dimension | None:
        return next((d for d in self.dimensions if d.key == "superclass"), None)

    def subject(self, classname: str) -> str:
        """How LLM questions refer to a class: 'a keeshond (a pet)'."""
        return f"a {classname} (a {self.domain})" if self.domain else f"a {classname}"

    def label_of(self, folder: str) -> int:
        """Label of an ImageFolder-style folder name ("american_bulldog", "n01558993").

        Sorted folder order is not label order (pets sorts "Sphynx" before "american_bulldog"),
        so consumers map folders by name with `class_key` (case, ' ', '_' and '-' are not significant).
        """
        if self.folders and folder in self.folders:
            return self.folders.index(folder)
        wanted = class_key(folder)
        for label, name in enumerate(self.classes):
            if class_key(name) == wanted:
                return label
        raise ZsdError(f"Folder {folder!r} matches no class of recipe {self.name!r}; rename it to one of its class names.")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe by bare name (`zsd/data/recipes/<name>.json`) or by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ZsdError(f"Unknown recipe {str(name_or_path)!r}; pass one of {', '.join(recipe_names())} or a path to a recipe .json file.")
    data = read_json(path, "Recipe file", f"pass a recipe name ({', '.join(recipe_names())}) or an existing .json path")
    return recipe_from_dict(data, source=str(path))


def read_json(path: Path, what: str, if_missing: str):
    """A user's JSON file, or one sentence saying what is wrong with it."""
    if not path.exists():
        raise ZsdError(f"{what} {path} does not exist; {if_missing}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ZsdError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from None


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    def fail(what: str):
        raise ZsdError(f"{source}: {what}.")

    if not isinstance(data, dict):
        fail("must be a JSON object")
    unknown = set(data) - {f for f in Recipe.__dataclass_fields__}
    if unknown:
        fail(f"unknown field(s) {', '.join(sorted(unknown))}")
    for required in ("name", "classes", "dimensions"):
        if required not in data:
            fail(f"missing field {required!r}")

    classes = data["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        fail("'classes' must be a non-empty list of class names")
    seen: dict[str, str] = {}
    for c in classes:
        if class_key(c) in seen:
            fail(f"duplicate class {c!r} (same as {seen[class_key(c)]!r})")
        seen[class_key(c)] = c

    if not isinstance(data["dimensions"], list):
        fail("'dimensions' must be a list")
    dims = []
    for entry in data["dimensions"]:
        if not isinstance(entry, dict) or "key" not in entry:
            fail(f"each dimension needs a 'key', got {entry!r}")
        key, question = entry["key"], entry.get("question")
        if not isinstance(key, str) or not _KEY.match(key):
            fail(f"dimension key {key!r} must be snake_case")
        if key not in DIMENSION_QUESTIONS and not question:
            fail(f"unknown dimension {key!r} (known: {', '.join(DIMENSION_QUESTIONS)}; or give it a 'question')")
        if set(entry) - {"key", "weight", "question"}:
            fail(f"dimension {key!r} has unknown field(s) {', '.join(sorted(set(entry) - {'key', 'weight', 'question'}))}")
        dims.append(Dimension(key, _weight(entry.get("weight", 1.0), f"weight of dimension {key!r}", fail), question))
    if len({d.key for d in dims}) != len(dims):
        fail("a dimension is listed twice")
    if len([d for d in dims if d.key != "superclass"]) < 2:
        fail("needs at least two contextual dimensions besides 'superclass' to combine pairwise")

    n = data.get("options_per_dimension", 15)
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        fail("'options_per_dimension' must be an integer >= 2")
    templates = data.get("templates", list(Recipe.templates))
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and "{c}" in t for t in templates):
        fail("'templates' must be a non-empty list of strings containing '{c}'")
    folders = data.get("folders")
    if folders is not None and (not isinstance(folders, list) or len(folders) != len(classes)):
        fail("'folders' must list one folder name per class")

    return Recipe(
        name=str(data["name"]),
        classes=tuple(classes),
        dimensions=tuple(dims),
        classname_weight=_weight(data.get("classname_weight", 1.0), "'classname_weight'", fail),
        options_per_dimension=n,
        domain=data.get("domain"),
        prompt_prefix=data.get("prompt_prefix", Recipe.prompt_prefix),
        templates=tuple(templates),
        folders=tuple(folders) if folders else None,
        description=data.get("description", ""),
    )


def _weight(value, what: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        fail(f"{what} must be a non-negative number, got {value!r}")
    return float(value)
