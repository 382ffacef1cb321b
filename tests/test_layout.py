"""The code's rooms: knnlm.py is the method and imports none of the tools; the tools in knnlm_tools/ are
small modules that import one another one way, and never each other's private names."""
import ast
import glob
import graphlib
import os

from helpers import ROOT

TOOLS = os.path.join(ROOT, "knnlm_tools")


def imports(path):
    """{module of knnlm_tools imported by the file at path: the names it takes from it}."""
    found = {}
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("knnlm_tools."):
            found.setdefault(node.module.split(".")[1], set()).update(a.name for a in node.names)
        if isinstance(node, ast.ImportFrom) and node.module == "knnlm_tools":
            found.update({a.name: set() for a in node.names})
        if isinstance(node, ast.Import):
            found.update({a.name.split(".")[1]: set() for a in node.names if a.name.startswith("knnlm_tools.")})
    return found


def modules():
    return {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(TOOLS, "*.py")) if not p.endswith("__init__.py")}


def test_the_tools_import_one_another_one_way():
    graph = {name: set(imports(path)) for name, path in modules().items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert set(order) == set(graph)
    assert not graph["files"] and not graph["search"]  # the low ones import none
    assert graph["corpora"] == {"files"}  # its downloads are written under files' lock


def test_no_module_takes_another_modules_private_names():
    for name, path in modules().items():
        for module, names in imports(path).items():
            assert not [n for n in names if n.startswith("_")], (name, module, names)


def test_each_module_is_small_enough_to_read_in_one_sitting():
    for name, path in modules().items():
        assert len(open(path).read().splitlines()) <= 350, name


def test_the_method_imports_none_of_the_tools():
    assert not imports(os.path.join(ROOT, "knnlm.py"))
