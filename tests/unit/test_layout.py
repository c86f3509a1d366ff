"""The package's shape: each module imports only modules before it in the pipeline, and knows nothing of
this checkout's layout."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tune_llama"

# The pipeline, bottom first. A module may import any module in an earlier (or its own) layer.
LAYERS = [
    ["errors", "paths", "pickles", "redact", "calculator", "paired", "progress_bar"],
    ["spec", "cli", "wheelhouse", "budget"],
    ["data"],
    ["model", "loss", "generate", "kernels", "memory"],
    ["loop", "checkpoint"],
    ["ray_private", "driver", "results", "resources"],
    ["trainable", "distributed", "evaluate", "live"],
    ["finalists", "summary"],
    ["preflight", "searcher", "callbacks", "study", "scheduler", "warm_start", "tracking", "trial_table"],
    ["tuner"],
    ["search", "train", "data.__main__"],  # data.__main__: the `data stats` command needs the tokenizer
    ["export", "plots", "report_html"],
    ["report", "demo", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "data.__main__" if parts == ("data", "__main__") else parts[0]


def is_main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``, where a module hands ``python -m`` over to the one parser."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
        isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"


def imported_modules(path: Path) -> set[str]:
    names = set()
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not is_main_block(node)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tune_llama."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "tune_llama":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tune_llama."))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports anywhere in it (inside functions and ``TYPE_CHECKING`` too), each
    submodule of ``tune_llama.data`` a module of its own (``data`` is its ``__init__``)."""
    def node(parts: list[str]) -> str:
        return ".".join(parts[:2]) if parts[0] == "data" and len(parts) > 1 else parts[0]

    graph = {}
    for path in PACKAGE.rglob("*.py"):
        here = node(list(path.relative_to(PACKAGE).with_suffix("").parts))
        if here == "data.__init__":
            here = "data"
        tree = ast.parse(path.read_text())
        tree.body = [n for n in tree.body if not is_main_block(n)]
        names = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "tune_llama":
                parts = n.module.split(".")[1:]
                for alias in n.names:  # `from tune_llama.data import packing` imports a module, not a name
                    whole = [*parts, alias.name]
                    is_module = PACKAGE.joinpath(*whole).with_suffix(".py").is_file() or \
                        PACKAGE.joinpath(*whole).is_dir()
                    names.add(node(whole if is_module else parts))
            elif isinstance(n, ast.Import):
                names.update(node(a.name.split(".")[1:]) for a in n.names if a.name.startswith("tune_llama."))
        graph[here] = names - {here}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another, directly or through others (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in graph.get(name, ()):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            group = []
            while not group or group[-1] != name:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_modules_import_each_other_even_through_others_or_inside_a_function():
    graph = import_graph()
    # What the check must see: the data submodules apart, and imports inside functions (search imports tuner so).
    assert "data.packing" in graph["data.batching"] and "tuner" in graph["search"]
    assert not circles(graph), [f"{group}: " + "; ".join(f"{a} imports {sorted(graph[a] & set(group))}"
                                                        for a in group) for group in circles(graph)]


def test_the_circle_check_finds_modules_that_import_each_other_through_others():
    graph = {"data.batching": {"data.packing"}, "data.packing": {"data.examples"}, "data.examples": set()}
    assert circles(graph) == []
    graph["data.examples"].add("data.batching")
    assert circles(graph) == [["data.batching", "data.examples", "data.packing"]]


LONG_MODULES = {"spec.py", "loop.py"}
"""The schema and the loop: each one whole thing a reader wants in one file."""
MAX_LINES, MAX_SEARCH_LINES = 450, 300


def test_modules_stay_a_few_hundred_lines():
    lines = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {name: n for name, n in lines.items() if n > MAX_LINES and name not in LONG_MODULES}
    assert lines["search.py"] <= MAX_SEARCH_LINES, "search.py is the command: building the Tuner is tuner.py's"


def test_every_module_has_a_place_in_the_pipeline():
    modules = {module_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert modules <= set(LAYER), f"add to LAYERS: {sorted(modules - set(LAYER))}"


def test_no_module_imports_one_above_it_in_the_pipeline():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = module_of(path)
        if here == "__init__":
            continue
        for name in imported_modules(path) - {here}:
            if LAYER.get(name, -1) > LAYER[here]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not upward, upward


def test_the_package_knows_nothing_of_this_checkouts_layout():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "../shared" in p.read_text()
                 or "shared/gsm8k" in p.read_text()]
    assert not offenders


def test_there_is_one_argument_parser_and_every_module_entry_calls_it():
    """``python -m tune_llama.X`` works for every command, through ``__main__``'s parser alone."""
    builders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                if "ArgumentParser(" in p.read_text() and p != PACKAGE / "__main__.py"]
    assert not builders, f"only tune_llama/__main__.py builds an ArgumentParser: {builders}"
    for path in set(PACKAGE.rglob("*.py")) - {PACKAGE / "__main__.py"}:
        blocks = [node for node in ast.parse(path.read_text()).body if is_main_block(node)]
        for block in blocks:
            assert "run_command(" in ast.unparse(block) and len(block.body) == 2, \
                f"{path.relative_to(PACKAGE)}: its __main__ block should only call tune_llama.__main__.run_command"


def string_literals(path: Path) -> list[str]:
    """Every string constant in a module but its docstrings (text about a name is not a use of it)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                  and isinstance(node.value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def owners_of(words: list[str], exact: bool = False) -> set[str]:
    """Modules with a string literal that holds one of ``words`` (``exact``: is it, or ends in ``/`` + it)."""
    def holds(text: str, word: str) -> bool:
        return text == word or text.endswith("/" + word) if exact else word in text
    return {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
            if any(holds(text, word) for text in string_literals(path) for word in words)}


def test_only_checkpoint_py_spells_a_checkpoint_file_name():
    from tune_llama import checkpoint
    names = [checkpoint.TRAINABLE, checkpoint.OPTIMIZER, checkpoint.STATE, checkpoint.METRICS, checkpoint.WORKERS,
             checkpoint.SPEC, checkpoint.SHARDED]
    assert owners_of(names, exact=True) - {"train.py"} == {"checkpoint.py"}  # train: its run folder's own spec.json


def test_only_results_py_spells_the_words_for_trial_states():
    from tune_llama import results
    assert owners_of([results.RUNG_STOPPED, results.EARLY_STOPPED, results.NO_RESULT]) == {"results.py"}
