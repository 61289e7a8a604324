"""bench/noop_decompose.py: the DAG without code deps / params is what it says, and DVC takes it as up to date."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_PYTHON_REFRESH": "quiet"}


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("noop_decompose", REPO / "bench" / "noop_decompose.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


def _paths(deps: list) -> list[str]:
    return [d if isinstance(d, str) else d["path"] for d in deps]


def test_strip_stages_on_the_projects_dag_removes_exactly_the_code_deps_and_params():
    bench = _bench()
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    for params in (False, True):
        new_yaml, new_lock = bench.strip_stages(dvc_yaml, dvc_lock, params=params)
        assert set(new_yaml["stages"]) == set(dvc_yaml["stages"]) and set(new_lock["stages"]) == set(dvc_lock["stages"])
        for doc, new in ((dvc_yaml, new_yaml), (dvc_lock, new_lock)):
            for name, stage in doc["stages"].items():
                kept = _paths(new["stages"][name].get("deps", []))
                before = _paths(stage.get("deps", []))
                assert kept == [p for p in before if not p.startswith(("spinedxa/", "stages/"))], name
                assert new["stages"][name].get("outs") == stage.get("outs"), name
                assert ("params" in new["stages"][name]) == ("params" in stage and not params), name
    # the inputs are not modified, and the project does have code deps to remove
    assert dvc_yaml == yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert dvc_lock == yaml.safe_load((REPO / "dvc.lock").read_text())
    assert any(p.startswith("spinedxa/") for s in dvc_lock["stages"].values() for p in _paths(s.get("deps", [])))


def _dvc(args: list[str], cwd: Path) -> str:
    return subprocess.run([DVC, *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True).stdout


def test_dvc_takes_the_stripped_lock_as_up_to_date_and_a_code_change_no_longer_reruns(tmp_path: Path):
    bench = _bench()
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "s.py").write_text("print('one')\n")
    (tmp_path / "params.yaml").write_text("s:\n  n: 1\n")
    (tmp_path / "data.txt").write_text("data\n")
    stage = {"cmd": "cat data.txt > out.txt", "deps": ["data.txt", "stages/s.py"], "params": ["s.n"],
             "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _dvc(["init", "-q"], tmp_path)
    _dvc(["repro", "-q"], tmp_path)
    new_yaml, new_lock = bench.strip_stages(yaml.safe_load((tmp_path / "dvc.yaml").read_text()),
                                            yaml.safe_load((tmp_path / "dvc.lock").read_text()), params=True)
    bench.use(tmp_path, (yaml.safe_dump(new_yaml), yaml.safe_dump(new_lock)))
    assert json.loads(_dvc(["status", "--json"], tmp_path) or "{}") == {}
    assert _paths(new_lock["stages"]["s"]["deps"]) == ["data.txt"] and "params" not in new_lock["stages"]["s"]
    (tmp_path / "stages" / "s.py").write_text("print('two')\n")  # no longer a dep: still up to date
    assert json.loads(_dvc(["status", "--json"], tmp_path) or "{}") == {}
    (tmp_path / "data.txt").write_text("changed\n")  # still a dep: the stage is out of date
    assert "s" in json.loads(_dvc(["status", "--json"], tmp_path))
