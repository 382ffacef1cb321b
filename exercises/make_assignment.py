"""
Exercises for a course: a student copy of the project in which chosen functions of knnlm.py
are left for the student to write. Each keeps its signature, decorators and docstring; its
body becomes `raise NotImplementedError("exercise NAME: the task")`, so the module still
imports and only calling that function raises. The tests listed with each exercise grade
it: they fail in the copy and pass once the function is written. docs/exercises.md has the
tasks, hints, and questions to answer with the experiments.

    python exercises/make_assignment.py OUT_DIR                         # every exercise
    python exercises/make_assignment.py OUT_DIR --only interpolate      # some of them
    python exercises/make_assignment.py --list                          # the exercises and their tests

The copy holds the project's tracked files (`git ls-files`; outside a git checkout, the tree
without build outputs, data and runs) and exercises/assignment.json, which names the blanked
functions and the command that grades each.
"""
import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "knnlm.py"
ASSIGNMENT_FILE = os.path.join("exercises", "assignment.json")   # in a student copy only

# name in knnlm.py -> (the task, the pytest node ids that grade it), in the module's order, which
# is the paper's. Each exercise's tests call no other blanked function, except that datastore_rows
# runs over sliding_batches, hence sliding_windows: do that one first.
G = "tests/test_exercises_grading.py::"
EXERCISES = {
    "sliding_windows": (
        "list the windows (begin, end, first scored position) over a text of n tokens: block_size tokens "
        "each, advancing by block_size - min_context, each scoring only the targets no window before it "
        "scored, so that every target is scored once (resolve_min_context gives min_context).",
        ["tests/test_knnlm.py::test_sliding_windows_score_every_target_once_with_min_context",
         G + "test_sliding_windows_by_hand"]),
    "datastore_rows": (
        "eq. 1: run the model over the text's sliding_batches and yield, batch by batch, the keys "
        "f(c_i) (of key_type, float32, on the CPU) and the values w_i of the scored positions only.",
        [G + "test_datastore_rows_hold_every_context_key_and_the_next_token",
         G + "test_datastore_rows_of_given_windows",
         "tests/test_knnlm.py::test_datastore_stores_every_next_token_as_value",
         "tests/test_knnlm.py::test_keys_written_equal_the_models_keys"]),
    "topk_l2": (
        "exact search: the k keys nearest to each query by ||q||^2 - 2 q.k + ||k||^2, one matmul per "
        "chunk of key_chunk keys, a top-k per chunk merged with the best so far; return the distances "
        "ascending and their ids (check_search_inputs and sort_neighbours help).",
        [G + "test_topk_l2_equals_brute_force",
         "tests/test_search.py::test_search_of_one_query_and_of_non_contiguous_inputs[torch-cpu]"]),
    "knn_log_prob": (
        "eq. 2 in log space: log p_kNN(target) is the log of the softmax weights exp(-d_i / T) of the "
        "neighbours whose value is the target, summed; -inf, never NaN, when none carries it.",
        [G + "test_knn_log_prob_by_hand",
         G + "test_knn_log_prob_at_extreme_temperatures",
         "tests/test_robustness.py::test_far_neighbours_keep_their_precision_in_float32"]),
    "knn_distribution": (
        "eq. 2 over the whole vocabulary: the softmax of -dists / T over the k neighbours, "
        "summed per token id into a [B, vocab_size] tensor.",
        [G + "test_knn_distribution_by_hand"]),
    "interpolate": (
        "eq. 3 in log space: log(λ p_kNN + (1 - λ) p_LM) from log p_LM and log p_kNN without "
        "leaving log space; λ = 0 gives log p_LM exactly, a probability 0 gives no NaN.",
        ["tests/test_knnlm.py::test_interpolation_in_log_space_equals_the_direct_formula",
         "tests/test_knnlm.py::test_lambda_zero_is_the_lm",
         G + "test_interpolate_when_a_probability_is_zero"]),
}

SKIP_DIRS = {".git", "build", "runs", "data", "__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = (".so", ".o", ".pyc", ".egg-info")


def grade_command(name):
    return "python -m pytest " + " ".join(f"'{i}'" if "[" in i else i for i in EXERCISES[name][1])


def project_files(root, git=True):
    """The project's files, relative to root: the tracked ones in a git checkout (with git), else the
    tree without version control, build outputs, data and runs."""
    if git:
        try:
            out = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, check=True).stdout
            return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))]
        except (OSError, subprocess.CalledProcessError):
            pass  # no git, or not a checkout
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES))
        files += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)
                  if not f.endswith(SKIP_SUFFIXES)]
    return files


def function_body(source, name):
    """(first line, last line) of the body of knnlm.py's top-level function `name` after its
    docstring, 1-based and inclusive, with any comment lines that end it."""
    defs = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    if name not in defs:
        raise SystemExit(f"{MODULE} has no function {name}")
    node, lines = defs[name], source.splitlines()
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
        isinstance(body[0].value.value, str)
    first = body[0].end_lineno + 1 if has_doc else body[0].lineno
    if (has_doc and len(body) == 1) or first <= node.lineno:
        raise SystemExit(f"{MODULE}: {name} has no body of its own lines to blank")
    last = node.end_lineno
    while last < len(lines) and lines[last].strip().startswith("#") and \
            len(lines[last]) - len(lines[last].lstrip()) > node.col_offset:
        last += 1
    return first, last


def blank(source, names):
    """knnlm.py's source with the body of each function in names replaced by its exercise."""
    lines = source.splitlines(keepends=True)
    spans = sorted(((function_body(source, name), name) for name in names), reverse=True)
    for (first, last), name in spans:  # bottom up: the line numbers above stay valid
        indent = lines[first - 1][:len(lines[first - 1]) - len(lines[first - 1].lstrip())]
        task = f"exercise {name}: {EXERCISES[name][0]}"
        assert '"' not in task and "\\" not in task, name
        call = f"{indent}raise NotImplementedError("
        pieces = textwrap.wrap(task, 110 - len(call), break_long_words=False)
        pieces = [p + " " for p in pieces[:-1]] + pieces[-1:]
        text = call + f"\n{' ' * len(call)}".join(f'"{p}"' for p in pieces) + ")\n"
        lines[first - 1:last] = [text]
    return "".join(lines)


def code_lines(text):
    """The lines of a text stripped of indentation and comments, blank ones dropped."""
    return [c for c in (line.split("  #")[0].strip() for line in text.splitlines()) if c and not c.startswith("#")]


def leaks(out_dir, source, names, long_line=50):
    """-> [(file, what)] for each file of the copy that holds a blanked body's line of long_line
    characters or more, or two of its lines in a row: a solution shipped by mistake (say in the docs)."""
    lines = source.splitlines()
    bodies = [code_lines("\n".join(lines[first - 1:last])) for first, last in (function_body(source, n) for n in names)]
    long = {line for body in bodies for line in body if len(line) >= long_line}
    pairs = {pair for body in bodies for pair in zip(body, body[1:])}
    found = []
    for path in project_files(out_dir, git=False):
        try:
            with open(os.path.join(out_dir, path), encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:  # a plot or other binary file
            continue
        code = code_lines(text)
        found += [(path, line) for line in sorted(long) if line in text]
        found += [(path, " / ".join(pair)) for pair in sorted(pairs & set(zip(code, code[1:])))]
    return found


def make_assignment(out_dir, names, root=ROOT):
    """Write the student copy of the project at root to out_dir, with the functions `names` blanked."""
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise SystemExit(f"no exercise {', '.join(unknown)}; the exercises: {', '.join(EXERCISES)}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"{out_dir} is a file: the copy goes into a new or empty directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir} exists and is not empty")
    if os.path.commonpath([os.path.realpath(out_dir), os.path.realpath(root)]) == os.path.realpath(root):
        raise SystemExit(f"{out_dir} is inside the project: write the copy elsewhere")
    names = [n for n in EXERCISES if n in names]   # in the module's order, once each
    for path in project_files(root):
        os.makedirs(os.path.dirname(os.path.join(out_dir, path)), exist_ok=True)
        shutil.copy2(os.path.join(root, path), os.path.join(out_dir, path))
    with open(os.path.join(root, MODULE), encoding="utf-8") as f:
        source = f.read()
    with open(os.path.join(out_dir, MODULE), "w", encoding="utf-8") as f:
        f.write(blank(source, names))
    os.makedirs(os.path.dirname(os.path.join(out_dir, ASSIGNMENT_FILE)), exist_ok=True)
    with open(os.path.join(out_dir, ASSIGNMENT_FILE), "w", encoding="utf-8") as f:
        json.dump({name: {"task": EXERCISES[name][0], "grade": grade_command(name)} for name in names},
                  f, indent=1, ensure_ascii=False)
        f.write("\n")
    return leaks(out_dir, source, names)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("out_dir", nargs="?", help="where to write the student copy (new or empty)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=list(EXERCISES),
                   help="blank only these functions (default: every exercise)")
    p.add_argument("--list", action="store_true", help="print the exercises and the tests that grade them")
    args = p.parse_args(argv)
    if args.list:
        for name, (task, ids) in EXERCISES.items():
            print(f"{name}\n  {task}\n  grade: {grade_command(name)}\n")
        return
    if args.out_dir is None:
        p.error("OUT_DIR is required (or --list)")
    names = args.only or list(EXERCISES)
    try:
        found = make_assignment(args.out_dir, names)
    except OSError as e:
        raise SystemExit(f"cannot write the copy to {args.out_dir}: {e.strerror or e}") from None
    print(f"wrote {args.out_dir}: {MODULE} with {', '.join(names)} to write; "
          f"{ASSIGNMENT_FILE} says how each is graded")
    for path, line in found:
        print(f"warning: {path} holds a solution's code: {line}", file=sys.stderr)
    if found:
        sys.exit(1)


if __name__ == "__main__":
    main()
