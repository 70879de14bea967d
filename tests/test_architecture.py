"""The module structure the README's layout promises, read from the source (imports inside functions and under
TYPE_CHECKING count): no import cycle in dsmoe/, methods reached only through the registry, experiment scripts
that import nothing from each other, and the method with torch and transformers only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = {"dsmoe.convert", "dsmoe.methods", "dsmoe.baselines"}  # DSMoE, the registry, the baselines' package


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The dsmoe modules a file imports anywhere in it (``from dsmoe import x`` counts as dsmoe.x)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(folder: str) -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / folder).rglob("*.py")}
    graph = {name: imported(path, set(files)) for name, path in files.items()}
    # a module importing a submodule of a package it is in needs the package, not more: drop the package edge
    return {name: {t for t in targets if t != name and not name.startswith(f"{t}.")} for name, targets in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_library():
    assert cycles(import_graph("dsmoe")) == []


def test_only_the_registry_imports_the_methods():
    """Library modules reach a method through dsmoe.methods (and the package's public names), never its file."""
    graph = import_graph("dsmoe")
    offenders = {  # dsmoe/__init__ re-exports DSMoE's public functions ("dsmoe" itself, not its submodules)
        name: sorted(t for t in targets if t.startswith("dsmoe.baselines") or t == "dsmoe.convert")
        for name, targets in graph.items()
        if name != "dsmoe" and not any(name == a or name.startswith(f"{a}.") for a in METHOD_FILES)
    }
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_experiment_scripts_import_nothing_from_each_other():
    scripts = {p.stem for p in (ROOT / "experiments").glob("*.py")}
    for path in (ROOT / "experiments").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "").split(".")[0] not in scripts, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in scripts, f"{path.name} imports {alias.name}"


def test_the_method_runs_with_torch_and_transformers_only():
    """The README's promise (someone can take DSMoE into their own trainer): ``import dsmoe``, convert, train a step
    and save/load with Lightning, OmegaConf, datasets and lm-eval unimportable (YAML is transformers' own)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, tempfile
        for blocked in ("lightning", "pytorch_lightning", "omegaconf", "datasets", "lm_eval", "torchmetrics"):
            sys.modules[blocked] = None  # importing it raises ImportError
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        import dsmoe
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2)
        model = dsmoe.convert(LlamaForCausalLM(config), dsmoe.DSMoEConfig(num_experts=4, tau=0.5))
        ids = torch.randint(0, 64, (2, 8))
        loss = model(input_ids=ids, labels=ids).loss + dsmoe.sparsity_loss(model)
        loss.backward()
        with tempfile.TemporaryDirectory() as out:
            dsmoe.save(model, out)
            dsmoe.load(out)
        print("ok", sorted(m for m in ("omegaconf", "lightning", "datasets") if sys.modules.get(m) is not None))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok []"
