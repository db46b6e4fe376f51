"""``zerostart coldstart`` on a shared machine: it makes only the model's own files cold (the
other processes' page cache stays), the machine-wide drop is an explicit, root-only choice, and
``--help`` says what each mode does."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from zerostart.bench import coldstart
from zerostart.bench._coldstart_runs import _make_cold

from tests.serve._helpers import child_env
from tests.weights.test_page_cache import cached_file, cached_fraction, warm


def _bystander(tmp_path) -> str:
    return cached_file(str(tmp_path / "another-process-file.bin"), size=64 << 20)


def _own_copy(tiny_model: str, tmp_path) -> str:
    """The model in a directory of its own: the session's copy is mapped by other tests' live
    workers, and the kernel keeps mapped pages cached (the eviction then says what stayed)."""
    return shutil.copytree(tiny_model, str(tmp_path / "model"))


def test_the_default_makes_only_the_files_of_the_start_cold(tiny_model: str, tmp_path) -> None:
    bystander = _bystander(tmp_path)
    model = os.path.join(_own_copy(tiny_model, tmp_path), "model.safetensors")
    warm(model)
    _make_cold([model], argparse.Namespace(page_cache="model"))
    assert cached_fraction(model) < 0.01 and cached_fraction(bystander) > 0.9
    warm(model)
    _make_cold([model], argparse.Namespace(page_cache="warm"))
    assert cached_fraction(model) > 0.99


def test_the_machine_wide_drop_is_refused_without_root(tiny_model: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    p = argparse.ArgumentParser()
    coldstart.add_arguments(p)
    with pytest.raises(SystemExit, match="needs root; --page-cache model"):
        coldstart.main(p.parse_args(["--model", tiny_model, "--page-cache", "machine"]))


def test_help_says_what_each_mode_does() -> None:
    r = subprocess.run([sys.executable, "-m", "zerostart", "coldstart", "--help"], env=child_env(), capture_output=True,
                       text=True, check=True)
    text = " ".join(r.stdout.split())
    assert "model: evict only the files the start reads" in text and "no root needed" in text
    assert "machine: drop the whole machine's page cache" in text and "root only" in text
    assert "warm: leave the page cache alone" in text and "(default: model)" in text


@pytest.mark.slow
def test_coldstart_leaves_other_files_cached(tiny_model: str, tmp_path) -> None:
    """A whole run (ceilings measured cold, a real worker started from the evicted checkpoint):
    a file of another process stays in the page cache throughout."""
    bystander = _bystander(tmp_path)
    out = tmp_path / "cs.json"
    model = _own_copy(tiny_model, tmp_path)
    r = subprocess.run([sys.executable, "-m", "zerostart", "coldstart", "--model", model, "--from", "source",
                        "--repeat", "1", "--json", str(out)], env=child_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # A drop of the whole page cache leaves none of it. Some may go to other processes' memory
    # pressure on a shared machine (whole 2 MiB folios at a time: a quarter of an 8 MiB file once).
    assert cached_fraction(bystander) > 0.5, (cached_fraction(bystander), r.stderr[-2000:])
    assert "page cache: model" in r.stdout and "best possible" in r.stdout and "of floor" not in r.stdout
    assert out.read_text().count('"page_cache": "model"') == 1
