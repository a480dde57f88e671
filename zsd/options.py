"""Options per class and contextual dimension, asked from a chat LLM or written by hand.

Options file (JSON; hand-written files use the same format):

    {"classes": {"keeshond": {"superclass": ["Dog", ...], "location": ["A cozy living room", ...], ...},
                 ...},
     "recipe": "pets", "n": 15}          # "recipe" and "n" are optional bookkeeping

Class order in the file is the label order when no recipe is given; the dimensions are the keys
of the first class. The LLM is asked once per (class, dimension), not once per caption: a
request for N distinct answers yields more diverse options than N independent requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from zsd.errors import ZsdError, write_atomic
from zsd.hub import load_local_or_hub, require_extra
from zsd.recipes import read_json

# A generator takes chat messages ([{"role": ..., "content": ...}]) and returns the reply text.
Generator = Callable[[list[dict]], str]

SYSTEM_PROMPT = ("You write short, concrete descriptions for photographs. Answer with a numbered list only, "
                 "one option per line, no explanations.")


@dataclass
class Options:
    classes: dict[str, dict[str, list[str]]]

    @property
    def dimensions(self) -> list[str]:
        return list(next(iter(self.classes.values()), {}))


def load_options(path: str | Path) -> Options:
    path = Path(path)
    data = read_json(path, "Options file", f"create it with `zsd options RECIPE --out {path}` or write it by hand")
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise ZsdError(f'Options file {path} needs a non-empty "classes" object: {{"classes": {{"<class>": {{"<dimension>": [...]}}}}}}.')
    for name, dims in classes.items():
        if not isinstance(dims, dict) or not all(
                isinstance(v, list) and v and all(isinstance(o, str) and o.strip() for o in v) for v in dims.values()):
            raise ZsdError(f"Options file {path}: class {name!r} must map each dimension to a non-empty list of strings.")
    return Options(classes)


# --- parsing LLM answers --------------------------------------------------------------------

_ITEM = re.compile(r"^\s*(?:\d+\s*[.):\]-]|[-*•·–]|\(\d+\))\s+(.*\S)\s*$")
_QUOTES = "\"'“”‘’`"


def parse_options(text: str) -> list[str]:
    """The options in an LLM answer: numbered ("1. x", "2) x") or bulleted ("- x", "* x", "• x")
    list items; preamble/epilogue lines that are not list items are ignored. If there is no list
    at all, non-empty lines are taken. Quotes, markdown emphasis and trailing periods are
    stripped; duplicates (case-insensitive) are dropped, first occurrence kept."""
    lines = text.splitlines()
    items = [m.group(1) for m in map(_ITEM.match, lines) if m]
    if not items:
        items = [line for line in lines if line.strip() and not line.rstrip().endswith(":")]
    options, seen = [], set()
    for item in items:
        item = item.replace("**", "").strip().strip(_QUOTES).strip().rstrip(".;,").strip().strip(_QUOTES).strip()
        if item and item.lower() not in seen:
            seen.add(item.lower())
            options.append(item)
    return options


def ask_options(generate: Generator, question: Callable[[int], str], n: int, retries: int = 3,
                what: str = "") -> list[str]:
    """Ask for n options (`question(k)` asks for k) until n distinct ones came back, collecting
    across attempts: a re-ask requests only the missing ones and names those already given."""
    collected: list[str] = []
    for _ in range(1 + retries):
        missing = n - len(collected)
        follow_up = f" Do not repeat any of these: {'; '.join(collected)}." if collected else ""
        reply = generate([{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": question(missing) + follow_up}])
        known = {o.lower() for o in collected}
        collected += [o for o in parse_options(reply) if o.lower() not in known]
        if len(collected) >= n:
            return collected[:n]
    raise ZsdError(f"The LLM gave only {len(collected)} of {n} distinct options for {what} after {1 + retries} "
                   f"requests; try another --model or write these options into the options file by hand.")


def collect_options(recipe, generate: Generator, out: str | Path, n: int | None = None, retries: int = 3) -> Options:
    """Fill `out` with n options per class and dimension of `recipe`, asking only for what is not
    there yet (the file is rewritten atomically after every class, so an interrupted run resumes)."""
    out = Path(out)
    n = n or recipe.options_per_dimension
    classes = load_options(out).classes if out.exists() else {}
    todo = [c for c in recipe.classes
            if any(len(classes.get(c, {}).get(d.key, [])) < n for d in recipe.dimensions)]
    for name in tqdm(todo, desc="options", unit="class"):
        entry = classes.setdefault(name, {})
        for dim in recipe.dimensions:
            if len(entry.get(dim.key, [])) < n:
                subject = recipe.subject(name)
                entry[dim.key] = ask_options(generate, lambda k: dim.question_for(subject, k), n, retries,
                                             what=f"class {name!r}, dimension {dim.key!r}")
        _write_json({"recipe": recipe.name, "n": n, "classes": classes}, out)
    return Options({c: classes[c] for c in recipe.classes})


def _write_json(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


# --- a transformers chat model as generator -------------------------------------------------


def hf_chat_generator(model: str, device: str = "auto", max_new_tokens: int = 512,
                      temperature: float = 0.7, seed: int = 0) -> Generator:
    """A Generator backed by a transformers causal LM (an HF hub id or a local directory).

    Local files are tried first so an offline machine fails at once instead of retrying the hub.
    """
    require_extra("synth", "transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, lm = load_local_or_hub(
        lambda n, **kw: (AutoTokenizer.from_pretrained(n, **kw), AutoModelForCausalLM.from_pretrained(n, **kw)),
        model, "--model", "chat model")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = lm.to(device).eval()
    torch.manual_seed(seed)  # sampling is reproducible for a run

    def generate(messages: list[dict]) -> str:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
        else:  # base models without a template: plain "role: content" turns
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        with torch.no_grad():
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=temperature > 0, temperature=temperature or None,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate
