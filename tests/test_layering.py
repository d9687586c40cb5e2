"""The package's layers, read from the modules' own import statements (function-level imports
included): data flows downhill, and the training engine and the evaluation stages do not know
each other."""

import ast
from pathlib import Path

import pathanat

SOURCE = Path(pathanat.__file__).parent

# each part of the package and the parts it may import (itself always allowed)
FOUNDATION = {"errors", "atomic", "jsonfiles", "config", "hardware", "figures", "metrics",
              "defaults"}
MAY_IMPORT = {
    **{part: FOUNDATION for part in FOUNDATION},
    "data": FOUNDATION | {"__init__"},  # (the package version, written into manifests)
    "models": FOUNDATION,
    "experiment": FOUNDATION | {"models"},
    "runs": FOUNDATION | {"data", "models", "experiment"},
    "training": FOUNDATION | {"data", "models", "experiment", "runs"},  # never evaluation
    "evaluation": FOUNDATION | {"data", "models", "experiment", "runs"},  # never training
    "reproduce": FOUNDATION | {"data", "models", "experiment", "runs", "training", "evaluation"},
    "demo": FOUNDATION | {"data", "experiment", "runs", "training", "evaluation", "reproduce"},
}


def part_of(module: str) -> str:
    """'pathanat.evaluation.fid' -> 'evaluation'; 'pathanat' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_module(name: str) -> bool:
    return (SOURCE / name).is_dir() or (SOURCE / f"{name}.py").is_file()


def imported_parts(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pathanat":  # a module of the package, or a name of __init__
                found |= {a.name if is_module(a.name) else "__init__" for a in node.names}
            elif node.module.startswith("pathanat."):
                found.add(part_of(node.module))
        elif isinstance(node, ast.Import):
            found |= {part_of(a.name) for a in node.names if a.name.startswith("pathanat")}
    return found


def test_every_module_imports_only_from_its_own_layer_or_below():
    wrong = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = ".".join(("pathanat", *path.relative_to(SOURCE).with_suffix("").parts))
        part = part_of(module) if path.parent != SOURCE or path.stem != "__init__" else "__init__"
        if part in ("__init__", "cli"):  # the version, and the command line over everything
            continue
        allowed = MAY_IMPORT[part] | {part}
        wrong += [f"{module} imports pathanat.{p}" for p in imported_parts(path) - allowed]
    assert not wrong, "\n".join(wrong)


def test_the_layering_check_sees_function_level_and_package_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from pathanat import runs, __version__\n"
                      "def f():\n    from pathanat.training.run import train\n"
                      "    import pathanat.evaluation.fid\n")
    assert imported_parts(source) == {"runs", "__init__", "training", "evaluation"}
