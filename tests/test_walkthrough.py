"""docs/walkthrough.py runs end to end, and docs/walkthrough.ipynb is made from it."""
import os

import jupytext

from helpers import ROOT, run, write_corpus

SCRIPT = os.path.join(ROOT, "docs", "walkthrough.py")
NOTEBOOK = os.path.join(ROOT, "docs", "walkthrough.ipynb")


def test_walkthrough_runs_as_a_script(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(200, 40, 40))
    env = {**os.environ, "KNNLM_DATA": data, "KNNLM_WALKTHROUGH_QUICK": "1",
           "KNNLM_WALKTHROUGH_PLOTS": str(tmp_path / "plots")}
    out = run("docs/walkthrough.py", cwd=tmp_path, env=env).stdout
    for checkpoint in ["steps in", "logits [1, 32, ", "keys [1, 32, 32]", "rows: keys", "query:",
                       "by hand", "== knn_log_prob", "== knn_distribution", "p at λ = 0.25",
                       "tuned on the first half", "second half: LM"]:
        assert checkpoint in out, f"{checkpoint!r} not in the output:\n{out}"
    assert sorted(os.listdir(tmp_path / "plots")) == ["explanation.png", "lambda_curve.png"]


def test_notebook_is_the_script():
    """Edit docs/walkthrough.py, then `jupytext --to ipynb docs/walkthrough.py` (or `jupytext --sync`)."""
    script, notebook = jupytext.read(SCRIPT), jupytext.read(NOTEBOOK)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [(c.cell_type, c.source) for c in script.cells], \
        "docs/walkthrough.ipynb is out of sync with docs/walkthrough.py: run `jupytext --sync docs/walkthrough.py`"
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert not any(c.get("outputs") for c in notebook.cells), \
        "docs/walkthrough.ipynb is kept without outputs: run `jupytext --to ipynb docs/walkthrough.py`"
