import json

import pytest

from zsd.cli import main
from zsd.errors import ZsdError
from zsd.options import ask_options, collect_options, hf_chat_generator, load_options, parse_options
from zsd.recipes import recipe_from_dict

MESSY = [
    ("Sure! Here are 4 locations:\n\n1. A cozy living room.\n2) A sunny garden\n3 - On a beach\n4. a cozy living room\n\nI hope this helps!",
     ["A cozy living room", "A sunny garden", "On a beach"]),
    ("- \"Directly overhead\"\n* Eye level\n• From below.\n  - **Close-up**", ["Directly overhead", "Eye level", "From below", "Close-up"]),
    ("Morning\nNoon\n\nEvening", ["Morning", "Noon", "Evening"]),
    ("Here you go:\n(1) Red, glossy\n(2) 'Blue'", ["Red, glossy", "Blue"]),
    ("10. Ten o'clock, 10:00 AM.\n11. Afternoon, around 1-2pm.", ["Ten o'clock, 10:00 AM", "Afternoon, around 1-2pm"]),
    ("", []),
]


@pytest.mark.parametrize("text,expected", MESSY)
def test_parse_options_handles_messy_llm_answers(text, expected):
    assert parse_options(text) == expected


class Scripted:
    """A fake chat LLM: returns the scripted replies in order and records the requests."""

    def __init__(self, *replies):
        self.replies, self.requests = list(replies), []

    def __call__(self, messages):
        self.requests.append(messages[-1]["content"])
        return self.replies.pop(0)


def test_too_few_options_are_re_asked_for_only_the_missing_ones():
    llm = Scripted("1. a\n2. b\n3. A", "Here:\n1. c\n2. b\n", "1. d\n2. e")
    assert ask_options(llm, lambda k: f"Give {k} things.", 4, retries=2) == ["a", "b", "c", "d"]
    assert llm.requests[0] == "Give 4 things."
    assert llm.requests[1].startswith("Give 2 things.") and "a; b" in llm.requests[1]


def test_persistently_short_answers_fail_naming_class_and_dimension():
    llm = Scripted("1. a", "1. a", "1. a")
    with pytest.raises(ZsdError, match="1 of 3 distinct options for class 'cat', dimension 'color' after 3 requests"):
        ask_options(llm, lambda k: "?", 3, retries=2, what="class 'cat', dimension 'color'")


RECIPE = recipe_from_dict({"name": "tiny", "domain": "pet", "classes": ["cat", "dog"], "options_per_dimension": 2,
                           "dimensions": [{"key": "superclass"}, {"key": "location"}, {"key": "daytime"}]})


def test_collect_options_asks_once_per_class_and_dimension_and_resumes(tmp_path):
    out = tmp_path / "options.json"
    llm = Scripted(*[f"1. {i}a\n2. {i}b" for i in range(6)])
    collect_options(RECIPE, llm, out)
    assert len(llm.requests) == 6
    assert "a cat (a pet)" in llm.requests[0] and "locations" in llm.requests[1]
    saved = load_options(out)
    assert saved.classes["dog"]["daytime"] == ["5a", "5b"] and saved.dimensions == ["superclass", "location", "daytime"]

    data = json.loads(out.read_text())
    del data["classes"]["dog"]["location"]  # as if interrupted while asking about the dog
    out.write_text(json.dumps(data))
    again = Scripted("1. x\n2. y")
    result = collect_options(RECIPE, again, out)
    assert len(again.requests) == 1 and result.classes["dog"]["location"] == ["x", "y"]
    assert result.classes["cat"] == saved.classes["cat"]


@pytest.mark.parametrize("content,message", [
    ("{", "not valid JSON"),
    ('{"cat": {}}', 'needs a non-empty "classes" object'),
    ('{"classes": {"cat": {"location": []}}}', "class 'cat' must map each dimension"),
])
def test_bad_options_files_fail_clearly(tmp_path, content, message):
    (tmp_path / "o.json").write_text(content)
    with pytest.raises(ZsdError, match=message):
        load_options(tmp_path / "o.json")


def test_missing_model_fails_at_once_with_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["options", "pets", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("zsd: error: Cannot load the chat model") and err.count("\n") == 0
    assert "Traceback" not in err and not (tmp_path / "o.json").exists()


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A randomly initialised GPT-2 with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "1.", "2.", "red", "blue", "garden", "beach", "morning", "user:", "assistant:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=256, n_embd=16, n_layer=1, n_head=2))
    path = tmp_path_factory.mktemp("tiny-chat")
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


def test_real_transformers_path_runs_and_reports_garbage_clearly(tiny_chat_model, tmp_path):
    generate = hf_chat_generator(str(tiny_chat_model), device="cpu", max_new_tokens=6)
    reply = generate([{"role": "user", "content": "List 2 colors"}])
    assert isinstance(reply, str) and "\n" not in reply  # its vocabulary has no line break
    # one line per reply -> at most one option per request: 1 + 1 retry cannot give 3 options
    with pytest.raises(ZsdError, match="for class 'cat', dimension 'superclass'"):
        collect_options(recipe_from_dict({**_RECIPE_DATA, "options_per_dimension": 3}), generate,
                        tmp_path / "o.json", retries=1)
    assert not (tmp_path / "o.json").exists()  # nothing half-written


_RECIPE_DATA = {"name": "tiny", "classes": ["cat"], "dimensions": [{"key": "superclass"}, {"key": "location"}, {"key": "daytime"}]}
