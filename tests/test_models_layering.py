"""The layer rules of jdpo/models: it knows no config and no data (nothing under jdpo.config, jdpo.data,
jdpo.train, jdpo.commands), its modules import each other without cycles and at their top, and
`import jdpo.config` (which reads jdpo.models.choices) still loads no JAX."""

import ast
import pathlib

from helpers import modules_imported_by

MODELS = pathlib.Path(__file__).resolve().parents[1] / "jdpo" / "models"
UPWARD = ("jdpo.config", "jdpo.data", "jdpo.train", "jdpo.commands", "jdpo.scoring")
# Platform kernels whose Pallas modules load only when that kernel runs.
LAZY_OK = ("jax.experimental.pallas",)


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) of every import statement in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "jdpo.models" else []
            out += [(n, id(node) in top) for n in names or [node.module]]
    return out


def test_models_import_nothing_upward_and_at_the_top():
    for path in sorted(MODELS.glob("*.py")):
        for module, at_top in _imports(path):
            assert not module.startswith(UPWARD), f"{path.name} imports {module}"
            assert at_top or module.startswith(LAZY_OK), f"{path.name} imports {module} inside a function"


def test_models_modules_form_no_cycle():
    graph = {
        p.stem: {m.split(".")[2] for m, _ in _imports(p) if m.startswith("jdpo.models.")}
        for p in MODELS.glob("*.py")
        if p.stem != "__init__"
    }
    done, active = set(), []

    def visit(node):
        assert node not in active, f"import cycle: {' -> '.join([*active[active.index(node) :], node])}"
        if node in done:
            return
        active.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        active.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_config_stays_jax_free():
    assert modules_imported_by("import jdpo.config", ["jax", "flax"]).strip() == "[]"
