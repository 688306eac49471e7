"""The kvm package's modules import each other one way (system -> vm -> vcpu -> exits/ioctl ->
structs), and neither kvm nor memory imports anything above it. Checked on the source, so an
import hidden behind ``typing.TYPE_CHECKING`` counts too."""

import ast
from pathlib import Path

import pystratovirt

PACKAGE = Path(pystratovirt.__file__).parent

# What each kvm module may import from its own package.
ALLOWED = {
    "structs": set(),
    "ioctl": {"structs"},
    "exits": {"structs"},
    "vcpu": {"ioctl", "structs", "exits"},
    "vm": {"ioctl", "structs", "vcpu"},
    "system": {"ioctl", "structs", "vm"},
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the pystratovirt modules ``path`` imports (anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.module is None:  # from . import a, b
                names.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                names.add(module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("pystratovirt")}


def test_kvm_modules_depend_one_way():
    for name, allowed in ALLOWED.items():
        # Modules outside the package (errors, util) are the next test's business.
        found = {m.removeprefix("pystratovirt.kvm.") for m in
                 imported_modules(PACKAGE / "kvm" / f"{name}.py", "pystratovirt.kvm")
                 if m.startswith("pystratovirt.kvm.")}
        assert found <= allowed, f"kvm/{name}.py imports {found - allowed}"


# Modules every layer may use: they import nothing from the package.
BASE = {"errors", "util"}


def test_kvm_and_memory_import_nothing_above_them():
    for layer, below in (("kvm", {"kvm"} | BASE), ("memory", {"kvm", "memory"} | BASE)):
        for path in (PACKAGE / layer).glob("*.py"):
            for module in imported_modules(path, f"pystratovirt.{layer}"):
                top = module.split(".")[1] if module.count(".") else module
                assert top in below, f"{layer}/{path.name} imports {module}"
