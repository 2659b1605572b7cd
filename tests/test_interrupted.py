"""A merge killed outright (kill -9) leaves its hidden staging folder; the next merge to the same
output removes it (only that output's, only when its process is gone) and says so."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hm3 import Hm3Warning, merge, parse_recipe
from hm3.checkpoint import atomic_directory

from conftest import recipe_dict

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A real `hm3 merge` that, once its first tensor is in the staging folder, signals and waits to be
# killed: the kill then lands mid-merge every time, not by luck of timing.
STALLED_MERGE = """
import sys, time
from pathlib import Path
import hm3.checkpoint as checkpoint
from hm3.cli import main

ready = Path(sys.argv[1])
write = checkpoint.ShardedWriter.write
def write_then_wait(self, name, tensor):
    write(self, name, tensor)
    if not ready.exists():
        ready.touch()
        time.sleep(600)
checkpoint.ShardedWriter.write = write_then_wait
sys.exit(main(sys.argv[2:]))
"""


def run_hm3(*args: str, script: Path | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "hm3.cli"]
    return subprocess.Popen([*command, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def partial_folders(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.*.partial"))


def test_kill_9_mid_merge_leaves_a_partial_folder_the_next_merge_removes(family, tmp_path):
    base, experts = family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(base, experts, parameters={"density": 0.5})))
    output, ready = tmp_path / "merged", tmp_path / "ready"
    script = tmp_path / "stalled.py"
    script.write_text(STALLED_MERGE)

    stalled = run_hm3(str(ready), "merge", str(recipe), "-o", str(output), "--no-progress",
                      script=script)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert stalled.poll() is None, stalled.stderr.read()
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.05)
        os.kill(stalled.pid, signal.SIGKILL)
        assert stalled.wait(timeout=30) == -signal.SIGKILL
    finally:
        if stalled.poll() is None:
            stalled.kill()
            stalled.wait()

    leftovers = partial_folders(output)
    assert not output.exists()
    assert [p.name.startswith(f".merged.pid{stalled.pid}.") for p in leftovers] == [True]
    assert any(f.suffix == ".safetensors" for f in leftovers[0].iterdir())  # it was mid-write

    # Beside it: another output's leftover, and one of a process that still runs.
    other = tmp_path / ".merged-v2.pid999999.abcdefgh.partial"
    alive = tmp_path / f".merged.pid{os.getppid()}.abcdefgh.partial"
    for folder in (other, alive):
        folder.mkdir()

    again = run_hm3("merge", str(recipe), "-o", str(output), "--no-progress")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert (f"hm3: warning: removed 1 unfinished folder(s) left beside {output.resolve()} by an "
            f"interrupted write: {leftovers[0].name}") in err
    assert (output / "model.safetensors").is_file()
    assert partial_folders(output) == [alive]
    assert other.is_dir()


def test_leftovers_of_older_versions_are_removed_and_nothing_else(family, tmp_path):
    base, experts = family
    output = tmp_path / "out"
    old = tmp_path / ".out.k3j9x_2a.partial"           # before the process id was in the name
    file = tmp_path / ".out.zzzzzzzz.partial"           # not a folder: not ours
    lookalike = tmp_path / ".out.v2.abcdefgh.partial"   # the staging of an output `out.v2`
    old.mkdir()
    lookalike.mkdir()
    file.write_text("x")
    with pytest.warns(Hm3Warning, match=r"removed 1 unfinished folder\(s\).*\.out\.k3j9x_2a\."):
        merge(parse_recipe(recipe_dict(base, experts)), output, progress=False)
    assert not old.exists()
    assert lookalike.is_dir() and file.is_file()
    assert (output / "config.json").is_file()


def test_a_failed_write_cleans_up_after_itself(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
