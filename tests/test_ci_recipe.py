"""docs/ci.md: its GitHub Actions and GitLab CI examples run the same commands, publish the reports
even when the job fails, and those commands, run as written in a temporary git repository (a
main branch with the bundled MLP and a pull request that keeps or breaks it), pass a kept
model and fail a regression, leaving the JUnit report and both HTML pages behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from helpers import ROOT
from onnx import numpy_helper

DOC = ROOT / "docs" / "ci.md"
MLP, MLP_X = ROOT / "samples" / "mlp.onnx", ROOT / "samples" / "mlp_inputs.npy"
MODEL, INPUTS = "models/classifier.onnx", "models/audit_inputs.npy"  # where the examples expect them


def yaml_blocks() -> dict[str, Any]:
    """The two YAML examples of docs/ci.md, parsed, by the heading they sit under."""
    text = DOC.read_text()
    blocks: dict[str, Any] = {}
    for heading, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S):
        found = re.findall(r"```yaml\n(.*?)```", body, flags=re.S)
        if found:
            blocks[heading.strip()] = yaml.safe_load(found[0])
    return blocks


def github_commands() -> list[str]:
    steps = yaml_blocks()["GitHub Actions"]["jobs"]["audit"]["steps"]
    return [line for s in steps if "run" in s for line in s["run"].strip().splitlines()]


def gitlab_commands() -> list[str]:
    job = yaml_blocks()["GitLab CI"]["model-audit"]
    return [*job["before_script"], *job["script"]]


def without_install(commands: list[str]) -> list[str]:
    """The commands a test can run here: the package is importable already (no pip install)."""
    return [c for c in commands if not c.startswith("pip install")]


def test_both_examples_run_the_same_commands() -> None:
    gh, gl = github_commands(), gitlab_commands()
    assert gh[0] == gl[0] == "pip install onnx-pathwise"
    assert without_install(gh) == without_install(gl)
    commands = without_install(gh)
    assert commands[-1] == "exit $status"
    audits = [c for c in commands if c.startswith("onnx-pathwise audit")]
    assert any("--report junit --out reports/audit.xml" in c for c in audits)
    assert any("--report html --out reports/audit.html" in c for c in audits)
    [diff] = [c for c in commands if c.startswith("onnx-pathwise diff")]
    assert diff.startswith(f"onnx-pathwise diff reports/main.onnx {MODEL}") and "--report html" in diff
    assert any(c.startswith("git show FETCH_HEAD:") for c in commands)  # the main branch's model


def test_both_examples_publish_the_reports_also_on_failure() -> None:
    blocks = yaml_blocks()
    steps = blocks["GitHub Actions"]["jobs"]["audit"]["steps"]
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/"
    junit = next(s for s in steps if "junit" in str(s.get("uses", "")))
    assert junit["if"] == "always()" and junit["with"]["report_paths"] == "reports/audit.xml"
    artifacts = blocks["GitLab CI"]["model-audit"]["artifacts"]
    assert artifacts["when"] == "always" and artifacts["paths"] == ["reports/"]
    assert artifacts["reports"]["junit"] == "reports/audit.xml"


def _git(cwd: Path, *args: str) -> None:
    env = os.environ | {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.invalid",
                        "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.invalid"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=60)


def _swap_classes(path: Path) -> None:
    """The regression: the last layer's rows for classes 0 and 1 swapped (predictions change)."""
    model = onnx.load(str(path))
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for init in model.graph.initializer:
        if init.name in last.input[1:]:
            w = numpy_helper.to_array(init).copy()
            w[[0, 1]] = w[[1, 0]]
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))


@pytest.fixture
def pull_request(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A clone whose 'origin' has main with the bundled MLP, checked out on a pull-request branch
    whose model is kept (a new producer string only) or broken, as the test asks."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    main = tmp_path / "main"
    (main / "models").mkdir(parents=True)
    shutil.copy(MLP, main / MODEL)
    shutil.copy(MLP_X, main / INPUTS)
    _git(main, "init", "-q", "-b", "main")
    _git(main, "add", "-A")
    _git(main, "commit", "-q", "-m", "model v1")
    _git(tmp_path, "clone", "-q", "--bare", str(main), "origin.git")
    work = tmp_path / "work"
    _git(tmp_path, "clone", "-q", str(tmp_path / "origin.git"), "work")
    _git(work, "checkout", "-q", "-b", "pull-request")
    if request.param == "kept":
        model = onnx.load(str(work / MODEL))
        model.producer_version = "retrained"
        onnx.save(model, str(work / MODEL))
    else:
        _swap_classes(work / MODEL)
    _git(work, "commit", "-q", "-am", "model v2")
    # `onnx-pathwise` on PATH is this checkout, whatever is installed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "onnx-pathwise"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m onnx_pathwise "$@"\n')
    shim.chmod(0o755)
    return work


def run_recipe(work: Path) -> subprocess.CompletedProcess[str]:
    """The GitHub example's commands as one bash script (GitHub runs `bash -e -o pipefail`)."""
    script = "\n".join(without_install(github_commands()))
    env = os.environ | {"PATH": f"{work.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("pull_request", ["kept"], indirect=True)
def test_a_kept_model_passes_with_every_report(pull_request: Path) -> None:
    res = run_recipe(pull_request)
    assert res.returncode == 0, res.stdout + res.stderr
    reports = pull_request / "reports"
    assert sorted(p.name for p in reports.iterdir()) == ["audit.html", "audit.xml", "diff.html", "diff.json", "main.onnx"]
    suite = ET.parse(reports / "audit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and int(suite.get("tests", "0")) == 7
    assert "PASSED" in (reports / "diff.html").read_text() and "PASSED" in (reports / "audit.html").read_text()


@pytest.mark.parametrize("pull_request", ["broken"], indirect=True)
def test_a_regression_fails_the_job_and_still_leaves_the_reports(pull_request: Path) -> None:
    res = run_recipe(pull_request)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout and "prediction(s) changed > 0" in res.stdout
    reports = pull_request / "reports"
    for name in ("audit.xml", "audit.html", "diff.json", "diff.html"):
        assert (reports / name).stat().st_size > 0, name
    diff = (reports / "diff.html").read_text()
    assert '<tr class="changed">' in diff and "FAILED" in diff
    expected = np.load(MLP_X)
    assert len(re.findall(r"<tr( class=\"changed\")?><td>sample \d+</td>", diff)) == len(expected)
