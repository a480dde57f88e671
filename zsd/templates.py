"""Zero-shot prompt templates per domain, as CLIP_benchmark uses them (`{c}` is the class name).

`resolve_templates(spec, dataset)` takes a domain name, a file (JSON list, JSON object with a
"templates" list such as a recipe, or plain text with one template per line), or nothing: then
the domain is guessed from the data set's name (`real_pets` -> pets), else the generic default.
"""

from __future__ import annotations

import json
from pathlib import Path

from zsd.errors import ZsdError

TEMPLATES = {
    "pets": ["a photo of a {c}, a type of pet."],
    "flowers": ["a photo of a {c}, a type of flower."],
    "food": ["a photo of {c}, a type of food."],
    "aircraft": ["a photo of a {c}, a type of aircraft.", "a photo of the {c}, a type of aircraft."],
    "cars": ["a photo of a {c}.", "a photo of the {c}.", "a photo of my {c}.", "i love my {c}!",
             "a photo of my dirty {c}.", "a photo of my clean {c}.", "a photo of my new {c}.",
             "a photo of my old {c}."],
    "textures": ["a photo of a {c} texture.", "a photo of a {c} pattern.", "a photo of a {c} thing.",
                 "a photo of a {c} object.", "a photo of the {c} texture.", "a photo of the {c} pattern.",
                 "a photo of the {c} thing.", "a photo of the {c} object."],
    # The 7-template subset that OpenAI's CLIP notebook selected from its 80 ImageNet templates.
    "imagenet": ["itap of a {c}.", "a bad photo of the {c}.", "a origami {c}.", "a photo of the large {c}.",
                 "a {c} in a video game.", "art of the {c}.", "a photo of the small {c}."],
    "default": ["a photo of a {c}."],
}

# Data set name fragments that identify a domain (checked in this order).
DOMAIN_HINTS = [("pet", "pets"), ("flower", "flowers"), ("food", "food"), ("aircraft", "aircraft"),
                ("car", "cars"), ("texture", "textures"), ("dtd", "textures"), ("imagenet", "imagenet")]


def guess_domain(dataset: str) -> str:
    name = dataset.lower()
    for fragment, domain in DOMAIN_HINTS:
        if fragment in name:
            return domain
    return "default"


def resolve_templates(spec: str | None, dataset: str = "") -> tuple[str, list[str]]:
    """(where the templates came from, the templates)."""
    if spec is None:
        domain = guess_domain(dataset)
        return domain, TEMPLATES[domain]
    if spec in TEMPLATES:
        return spec, TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ZsdError(f"--templates {spec} is neither a domain ({', '.join(TEMPLATES)}) nor a file")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ZsdError(f"{path} is not valid JSON ({e})") from None
        templates = data.get("templates") if isinstance(data, dict) else data
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ZsdError(f"{path} holds no list of templates (a JSON list, an object with \"templates\", "
                       "or one template per line)")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ZsdError(f"template {bad[0]!r} in {path} has no {{c}} placeholder for the class name")
    return str(path), templates
