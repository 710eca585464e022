"""The shape of the package: no import cycle, one owner per fact, one module per command."""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
from import_graph import PACKAGE_ROOT, cycles, import_graph, module_files


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "vqdeploy.ops.custom_op" in graph and "vqdeploy.ops.contract" in graph["vqdeploy.ops.cpu_kernels"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_kernels_import_only_the_contract_of_the_op():
    graph = import_graph()
    for kernel in ("vqdeploy.ops.cpu_kernels", "vqdeploy.ops.triton_kernels"):
        ops = {m for m in graph[kernel] if m.startswith("vqdeploy.ops")}
        assert ops <= {"vqdeploy.ops.contract", "vqdeploy.ops._running_argmin", "vqdeploy.ops.gemm",
                       "vqdeploy.ops.sgemm_entry"}, (kernel, ops)
    assert not {m for m in graph["vqdeploy.ops.contract"] if m.startswith("vqdeploy.")} - {"vqdeploy.errors"}
    assert not {m for m in graph["vqdeploy.ops.sgemm_entry"] if m.startswith("vqdeploy.")}  # a leaf: the BLAS entries


LAYOUT_NAME = re.compile(r"""["'](b n d|b d n|b d h w)["']""")


def test_layout_names_are_spelled_only_in_the_spec():
    spelled = {name: [m.group(1) for m in LAYOUT_NAME.finditer(path.read_text())] for name, path in module_files().items()}
    assert {name for name, found in spelled.items() if found} == {"vqdeploy.spec"}


def test_every_command_is_one_module_with_the_same_interface():
    from vqdeploy.cli import app

    commands = {path.stem for path in (PACKAGE_ROOT / "cli").glob("*.py")} - {"__init__", "app", "common", "output"}
    assert {module.__name__.rpartition(".")[2] for module in app.COMMANDS} == commands
    for module in app.COMMANDS:
        assert all(hasattr(module, attr) for attr in ("NAME", "HELP", "EPILOG", "add_arguments", "run")), module
    names = [module.NAME for module in app.COMMANDS]
    assert len(set(names)) == len(names)


def test_no_function_hides_a_module_of_its_name():
    import vqdeploy
    import vqdeploy.ops

    assert callable(vqdeploy.verify) and callable(vqdeploy.ops.nearest_code)
    modules = module_files()
    for package in ("vqdeploy", "vqdeploy.ops", "vqdeploy.parity", "vqdeploy.cli", "vqdeploy.runtime", "vqdeploy.nn"):
        namespace = importlib.import_module(package)
        for name, value in vars(namespace).items():
            if callable(value) and not isinstance(value, type):
                assert f"{package}.{name}" not in modules, f"{package}.{name} is a function and a module"


@pytest.mark.parametrize(("old", "name", "new"), [
    ("vqdeploy.verify", "verify", "vqdeploy.parity"),
    ("vqdeploy.verify", "default_inputs", "vqdeploy.parity"),
    ("vqdeploy.ops.nearest_code", "certify", "vqdeploy.ops.contract"),
    ("vqdeploy.ops.nearest_code", "nearest_code", "vqdeploy.ops.custom_op"),
])
def test_old_import_paths_still_work_and_say_where_to_go(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=new):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(f"from {old} import {name} as imported", namespace := {})
    assert namespace["imported"] is value
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_the_old_polygraphy_path_points_at_the_adapter():
    pytest.importorskip("polygraphy")
    module = importlib.import_module("vqdeploy.polygraphy_check")
    with pytest.warns(DeprecationWarning, match="parity.polygraphy_adapter"):
        assert callable(module.compare_with_polygraphy)
