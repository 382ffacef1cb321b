"""The exercises of exercises/make_assignment.py: the student copy imports, blanks exactly the chosen
functions of knnlm.py and ships their bodies nowhere else; each exercise's grading tests fail in
the copy, with that exercise's NotImplementedError, and pass in this repository."""
import ast
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import torch

import knnlm
from exercises import make_assignment as assignment
from helpers import ROOT

pytestmark = pytest.mark.skipif(os.path.exists(os.path.join(ROOT, assignment.ASSIGNMENT_FILE)),
                                reason="a student copy: its exercises are blanked")
with open(os.path.join(ROOT, "knnlm.py"), encoding="utf-8") as f:
    SOURCE = f.read()


def functions(path):
    """name -> the ast of each top-level function of a module file."""
    with open(path, encoding="utf-8") as f:
        return {n.name: n for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}


def is_blanked(node):
    """The function's body is its docstring, then `raise NotImplementedError("exercise NAME: ...")`."""
    doc, *rest = node.body
    return isinstance(doc.value, ast.Constant) and len(rest) == 1 and isinstance(rest[0], ast.Raise) and \
        rest[0].exc.func.id == "NotImplementedError" and rest[0].exc.args[0].value.startswith(f"exercise {node.name}:")


def start_pytest(node_ids, cwd, log):
    """Start `python -m pytest` on node_ids in cwd, its output to the file log; -> (Popen, log)."""
    with open(log, "w") as out:  # the child holds its own copy of the file
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tb=short",
                                 *node_ids], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # seven side by side on few cores
    return proc, log


def finish(run):
    proc, log = run
    returncode = proc.wait(timeout=300)
    with open(log) as f:
        return returncode, f.read()


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """The student copy with every exercise blanked."""
    out = str(tmp_path_factory.mktemp("assignment") / "knnlm")
    assert assignment.make_assignment(out, list(assignment.EXERCISES)) == []  # no solution left anywhere
    return out


@pytest.fixture(scope="module")
def grading_runs(copy, tmp_path_factory):
    """Each exercise's grading tests in the copy, and all of them here, run side by side:
    -> {exercise name or None for here: (return code, output)}."""
    logs = tmp_path_factory.mktemp("logs")
    runs = {name: start_pytest(ids, copy, logs / f"{name}.log") for name, (_, ids) in assignment.EXERCISES.items()}
    every_id = [i for _, ids in assignment.EXERCISES.values() for i in ids]
    runs[None] = start_pytest(every_id, ROOT, logs / "solution.log")
    return {name: finish(run) for name, run in runs.items()}


@pytest.mark.parametrize("name", list(assignment.EXERCISES))
def test_grading_tests_fail_in_the_student_copy(grading_runs, name):
    returncode, output = grading_runs[name]
    summary = output.strip().splitlines()[-1]
    assert returncode == 1, output  # tests failed (2-5: interrupted, usage error, a node id not found)
    assert "passed" not in summary and "skipped" not in summary, output
    assert f"NotImplementedError: exercise {name}:" in output, output


def test_grading_tests_pass_with_the_solutions(grading_runs):
    returncode, output = grading_runs[None]
    summary = output.strip().splitlines()[-1]
    assert returncode == 0 and "passed" in summary, output
    assert not any(word in summary for word in ("skipped", "failed", "error", "deselected")), output


def test_the_copy_imports_and_only_calling_an_exercise_raises(copy):
    spec = importlib.util.spec_from_file_location("student_knnlm", os.path.join(copy, "knnlm.py"))
    student = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(student)
    with pytest.raises(NotImplementedError, match="exercise interpolate: eq. 3"):
        student.interpolate(torch.zeros(2), torch.zeros(2), 0.5)
    with pytest.raises(NotImplementedError, match="exercise datastore_rows"):
        student.datastore_rows(None, torch.arange(10))  # no longer a generator: it raises when called
    assert student.perplexity(torch.zeros(3)) == 1.0
    for name in assignment.EXERCISES:  # signatures and docstrings kept
        mine, theirs = getattr(knnlm, name), getattr(student, name)
        assert theirs.__doc__ == mine.__doc__ and inspect.signature(theirs) == inspect.signature(mine)


def test_the_copy_blanks_every_exercise_and_nothing_else(copy):
    original, student = functions(os.path.join(ROOT, "knnlm.py")), functions(os.path.join(copy, "knnlm.py"))
    assert original.keys() == student.keys()
    for name, node in original.items():
        if name in assignment.EXERCISES:
            assert is_blanked(student[name]), name
        else:
            assert ast.dump(student[name]) == ast.dump(node), name
    # every other file of the project is there, unchanged
    for path in assignment.project_files(ROOT):
        if path != "knnlm.py":
            with open(os.path.join(ROOT, path), "rb") as a, open(os.path.join(copy, path), "rb") as b:
                assert a.read() == b.read(), path


def test_only_blanks_the_functions_named(tmp_path):
    assert assignment.make_assignment(str(tmp_path), ["knn_log_prob", "interpolate"]) == []
    student = functions(tmp_path / "knnlm.py")
    assert {name for name, node in student.items() if is_blanked(node)} == {"knn_log_prob", "interpolate"}
    assert assignment.EXERCISES.keys() <= functions(os.path.join(ROOT, "knnlm.py")).keys()
    with pytest.raises(SystemExit, match="no exercise perplexity"):
        assignment.make_assignment(str(tmp_path / "other"), ["perplexity"])
    with pytest.raises(SystemExit, match="not empty"):
        assignment.make_assignment(str(tmp_path), ["interpolate"])


def test_a_solution_quoted_elsewhere_is_found(tmp_path):
    assert assignment.make_assignment(str(tmp_path / "copy"), ["knn_distribution"]) == []
    first, last = assignment.function_body(SOURCE, "knn_distribution")
    body = SOURCE.splitlines()[first - 1:last]
    with open(tmp_path / "copy" / "README.md", "a", encoding="utf-8") as f:
        f.write("\n```python\n" + "\n".join(body) + "\n```\n")
    assert {path for path, _ in assignment.leaks(str(tmp_path / "copy"), SOURCE, ["knn_distribution"])} == \
        {"README.md"}


def test_list_prints_each_exercise_and_its_grading_command(capsys):
    assignment.main(["--list"])
    out = capsys.readouterr().out
    for name, (task, ids) in assignment.EXERCISES.items():
        assert name in out and all(i in out for i in ids)
