"""Offline: a missing download is one line naming the flag to use instead, in under 2 s, with no
third-party ERROR line; the hub probe honours proxies and HF_HUB_OFFLINE."""

import importlib
import importlib.util
import json
import logging
import socket
import time
import warnings

import pytest

from zsd import hub
from zsd.cli import main


@pytest.fixture
def online_settings(monkeypatch):
    """As on a user's machine: HF_HUB_OFFLINE unset (the tests set it), no proxy, a fresh probe cache."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # never resolves: no real network in a test
    hub._reachable.cache_clear()
    yield monkeypatch
    hub._reachable.cache_clear()


@pytest.fixture
def listening_port():
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def closed_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_hf_hub_offline_answers_without_opening_a_socket(online_settings):
    online_settings.setenv("HF_HUB_OFFLINE", "1")

    def no_socket(*args, **kwargs):
        raise AssertionError("probed the network under HF_HUB_OFFLINE")

    online_settings.setattr(socket, "create_connection", no_socket)
    assert not hub.hub_reachable()


def test_the_probe_goes_through_the_https_proxy_unless_no_proxy_exempts_the_hub(online_settings, listening_port):
    assert hub.probe_address("hub.invalid") == ("hub.invalid", 443)
    online_settings.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening_port}")
    assert hub.probe_address("hub.invalid") == ("127.0.0.1", listening_port)
    assert hub.hub_reachable()  # the hub's own name does not resolve, but the proxy answers
    online_settings.setenv("NO_PROXY", "hub.invalid")
    assert hub.probe_address("hub.invalid") == ("hub.invalid", 443)
    assert not hub.hub_reachable()
    online_settings.delenv("NO_PROXY")
    online_settings.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")
    assert not hub.hub_reachable()


def one_error_line(capsys, argv, seconds=2.0):
    t = time.perf_counter()
    with pytest.raises(SystemExit) as e, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(argv)
    assert not [str(w.message) for w in caught]  # a library warning on the way would be a second line
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("zsd: error: "), err
    assert elapsed < seconds, f"{elapsed:.1f} s: retried instead of failing at once"
    return err


def test_options_and_synth_fail_at_once_offline(online_settings, capsys, tmp_path):
    """A hub id that is not cached, with a dead proxy: huggingface_hub would back off for ~50 s."""
    pytest.importorskip("diffusers")
    # the clock measures the failure, not the first import of diffusers and transformers
    importlib.import_module("diffusers.pipelines.auto_pipeline")
    importlib.import_module("transformers.models.auto.modeling_auto")
    online_settings.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")
    err = one_error_line(capsys, ["options", "pets", "--model", "no-org/no-such-llm", "--out", str(tmp_path / "o.json")])
    assert "--model" in err and "unreachable" in err
    (tmp_path / "p.jsonl").write_text(json.dumps({"class": "cat", "label": 0, "prompt": "a cat", "seed": 0}) + "\n")
    err = one_error_line(capsys, ["synth", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"),
                                  "--model", "no-org/no-such-diffusion-model"])
    assert "--model" in err and "unreachable" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.json").exists()


def test_synth_without_the_extra_names_it(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    (tmp_path / "p.jsonl").write_text(json.dumps({"class": "cat", "label": 0, "prompt": "a cat", "seed": 0}) + "\n")
    err = one_error_line(capsys, ["synth", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")])
    assert "pip install 'zsd[synth]'" in err and "diffusers" in err


def test_a_missing_open_clip_download_is_zsds_line_only(online_settings, caplog):
    from zsd.errors import ZsdError
    from zsd.teachers import create_teacher

    online_settings.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.DEBUG), pytest.raises(ZsdError, match="--pretrained") as e:
        create_teacher("ViT-B-32", "datacomp_xl_s13b_b90k", "cpu")
    assert "\n" not in str(e.value)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # open_clip's logging.error
