"""The house rules of docs/ARCHITECTURE.md, checked: layers point down only, no import cycle between
modules (imports inside functions counted), imports inside functions only for optional heavy
dependencies, and one list of bit widths shared by Python and C."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from leank.kernels.quant import BITS, PACKABLE_BITS

ROOT = Path(__file__).resolve().parent.parent
# bottom to top: a package may import its own layer and the ones below, never one above
LAYERS = {"errors": 0, "kernels": 1, "runtime": 2, "masks": 3, "convert": 4, "cli": 5, "__init__": 6}
# leank modules that import TileLang at their top: the only leank imports allowed inside functions
LAZY_LEANK = {"leank.kernels.tl_decode", "leank.kernels.tl_gemv", "leank.kernels.tl_quant", "leank.kernels.tilelang_ops"}
# optional or heavy third-party packages, imported where they are needed
LAZY_THIRD_PARTY = {"tilelang", "llama_cpp", "faker", "prompt_toolkit", "uvicorn"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", ".venv", "build", "docs") or rel.parts[0].startswith("."):
            continue
        name = ".".join(("leank",) + rel.with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(leank module or third-party top name, inside a function?, line) for every import in `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.append((a.name, nested, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:  # `from leank.kernels import cpu` imports the module leank.kernels.cpu
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in known else child.module, nested, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_layers_point_down_and_function_imports_are_only_for_optional_dependencies():
    mods = modules()
    known = set(mods)
    problems = []
    for name, path in mods.items():
        for target, nested, line in imports(path, known):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target.split(".")[0] == "leank":
                if target == "leank":
                    problems.append(f"{where}: imports the package facade `leank`")
                elif layer(target) > layer(name):
                    problems.append(f"{where}: {name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
                if nested and target not in LAZY_LEANK:
                    problems.append(f"{where}: imports {target} inside a function")
            elif nested and target.split(".")[0] not in LAZY_THIRD_PARTY:
                problems.append(f"{where}: imports {target} inside a function (only optional or heavy packages may)")
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_modules():
    mods = modules()
    known = set(mods)
    graph = {name: {t for t, _, _ in imports(path, known) if t in known and t != name} for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "leank":
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_the_c_kernels_accept_exactly_the_python_bit_widths():
    source = (ROOT / "kernels" / "cpu_decode.c").read_text()
    checks = source.split("static int heads_ok(")[1].split("\n}")[0]  # both attention entry points call it
    for entry in ("int leank_attend_layer(", "int leank_attend_chunk("):
        assert "heads_ok(" in source.split(entry)[1].split("\n}")[0], entry
    for side in ("k_bits", "v_bits"):
        accepted = {int(b) for b in re.findall(rf"\b{side} == (\d+)", checks)}
        assert accepted == set(BITS), f"cpu_decode.c accepts {side} in {sorted(accepted)}, Python in {BITS}"
    quant_c = (ROOT / "kernels" / "cpu_quant.c").read_text()
    packable = {int(b) for b in re.findall(r"\bbits == (\d+)", quant_c.split("static int check(")[1].split("}")[0])}
    assert packable == set(PACKABLE_BITS), f"cpu_quant.c quantizes {sorted(packable)}, Python {PACKABLE_BITS}"
    for side in ("k_bits", "v_bits"):
        accepted = {int(b) for b in re.findall(rf"\b{side} == (\d+)", quant_c.split("int leank_compact_layer(")[1].split("const int esz")[0])}
        assert accepted == set(BITS), f"cpu_quant.c moves {side} in {sorted(accepted)}, Python in {BITS}"
