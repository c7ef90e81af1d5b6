"""The content-addressed store: atomic publish, validity checks, crash safety, code versions."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agcpipe.store import ARTIFACT_META, Store, code_version, module_files, stage_key


def _build(store: Store, key: str, content: bytes = b"abc") -> Path:
    with store.build("s", key, {"summary": {"x": 1}}) as tmp:
        (tmp / "a.bin").write_bytes(content)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("hello")
    return store.path("s", key)


def test_build_publishes_complete_artifact(tmp_path):
    store = Store(tmp_path)
    path = _build(store, "k1")
    art = store.get("s", "k1")
    assert art is not None and art.path == path
    assert art.meta["files"] == {"a.bin": 3, "sub/b.txt": 5}
    assert art.meta["summary"] == {"x": 1}
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["k1"]  # no temp folder left


def test_failed_build_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.build("s", "k1") as tmp:
            (tmp / "a.bin").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list((tmp_path / "s").iterdir()) == []
    assert store.get("s", "k1") is None


@pytest.mark.parametrize("damage", ["delete", "truncate", "meta"])
def test_damaged_artifact_is_invalid_and_removed(tmp_path, damage):
    store = Store(tmp_path)
    path = _build(store, "k1")
    if damage == "delete":
        (path / "sub" / "b.txt").unlink()
    elif damage == "truncate":
        (path / "a.bin").write_bytes(b"a")
    else:
        (path / ARTIFACT_META).unlink()
    assert not store.is_valid("s", "k1")
    assert store.get("s", "k1") is None
    assert not path.exists()  # cleared so that the next build can publish
    _build(store, "k1")
    assert store.is_valid("s", "k1")


def test_second_publish_of_same_key_keeps_first(tmp_path):
    store = Store(tmp_path)
    _build(store, "k1", b"first")
    _build(store, "k1", b"other")  # e.g. a concurrent run finishing second
    assert (store.path("s", "k1") / "a.bin").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["k1"]


def test_killed_build_leaves_only_a_temp_folder_that_is_cleaned(tmp_path):
    script = textwrap.dedent(
        f"""
        import time
        from agcpipe.store import Store
        with Store({str(tmp_path)!r}).build("s", "k1") as tmp:
            (tmp / "a.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path)
    leftovers = list((tmp_path / "s").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-k1-")
    assert store.get("s", "k1") is None
    assert store.clean_stale() == 1
    assert list((tmp_path / "s").iterdir()) == []


def test_clean_stale_keeps_live_builds(tmp_path):
    store = Store(tmp_path)
    with store.build("s", "k1") as tmp:
        assert store.clean_stale() == 0  # our own process is alive
        assert tmp.exists()


def test_code_version_follows_source_content(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg_cv"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module_files.cache_clear()
    v1 = code_version(["fakepkg_cv"])
    assert code_version(["fakepkg_cv.mod"]) != v1  # package vs single module
    time.sleep(0.01)
    (pkg / "mod.py").write_text("X = 2\n")
    os.utime(pkg / "mod.py", None)
    assert code_version(["fakepkg_cv"]) != v1
    (pkg / "mod.py").write_text("X = 1\n")
    assert code_version(["fakepkg_cv"]) == v1  # content, not mtime, decides


def test_stage_key_depends_on_inputs_and_code():
    k = stage_key("precompute", ["agcpipe.ops"], {"a": 1})
    assert k == stage_key("precompute", ["agcpipe.ops"], {"a": 1})
    assert k != stage_key("precompute", ["agcpipe.ops"], {"a": 2})
    assert k != stage_key("precompute", ["agcpipe.metrics"], {"a": 1})
    assert k != stage_key("cluster", ["agcpipe.ops"], {"a": 1})
