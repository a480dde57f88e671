"""Runs that cannot learn what they claim are refused before step 1, never reported as a success (#32)."""

import os

import pytest

from zsd.errors import ZsdError
from zsd.loader import TrainTargets


def test_one_store_passed_twice_is_refused_under_any_spelling(store, tmp_path, monkeypatch):
    """The same store twice would silently double every epoch while the summary says one."""
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(store, tmp_path)
    for specs in ([str(store), str(store)], [str(store), relative], [f"{store}=1", f"./{relative}/=2"]):
        with pytest.raises(ZsdError, match="are the same store") as e:
            TrainTargets(specs, log=lambda m: None)
        assert "pass it once" in str(e.value) and "\n" not in str(e.value)
    assert TrainTargets([str(store)], log=lambda m: None).rows_per_epoch > 0
