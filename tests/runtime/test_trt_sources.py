"""The TensorRT layer against TensorRT's own sources, read from NVIDIA's real bindings wheels.

Nothing here imports TensorRT (it cannot load without libnvinfer): the rules are read from the
wheel's ``tensorrt.plugin`` sources with `ast`, the symbol names from ``tensorrt.so``'s strings,
and vqdeploy's plugin is read with `ast` too, so each check is rule-of-the-wheel against
code-of-vqdeploy. The wheels are fetched by the ``tensorrt_wheel`` fixture (conftest.py).
"""

from __future__ import annotations

import ast
import builtins
import copy
import inspect
import itertools
import warnings
from pathlib import Path

import pytest

from vqdeploy.runtime import tensorrt as trt_backend
from vqdeploy.runtime import trt_plugin

PLUGIN_SOURCE = Path(inspect.getfile(trt_plugin)).read_text()
TRT_11_4 = "tensorrt-cu13-bindings==11.4.0.106"
TRT_10_9 = "tensorrt-cu12-bindings==10.9.0.34"  # the first release with tensorrt.plugin.aot_impl
TRT_10_8 = "tensorrt-cu12-bindings==10.8.0.43"


def _parse(source: str) -> ast.Module:
    with warnings.catch_warnings():  # NVIDIA's docstrings hold "\\s" escapes
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source)


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"no function {name} in the wheel: its rules moved, re-read them")


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _issubclass_targets(node: ast.AST) -> set[str]:
    """Names X of every issubclass(..., X) in a validator: the classes it accepts."""
    found = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "issubclass":
            target = call.args[1]
            if isinstance(target, ast.Name):
                found.add(target.id)
    return found


def _schema_tail(node: ast.FunctionDef) -> list[str]:
    """The fixed parameters a validator expects after the tensors, e.g. ['outputs', 'stream']."""
    tails = [s for s in _strings(node) if s.startswith(", outputs")]
    assert len(tails) == 1, f"{node.name}: expected one ', outputs...' schema string, found {tails}"
    return [part.strip() for part in tails[0].strip(", )").split(",")]


def _plugin_functions() -> dict[str, ast.FunctionDef]:
    """vqdeploy's decorated plugin functions, by decorator: register, autotune, impl, aot_impl."""
    found = {}
    for node in ast.walk(ast.parse(PLUGIN_SOURCE)):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and isinstance(decorator.func.value, ast.Name) and decorator.func.value.id == "trtp"):
                    found[decorator.func.attr] = node
    return found


def _annotation(node: ast.expr | None) -> str:
    return "" if node is None else ast.unparse(node).replace("trtp.", "tensorrt.plugin.")


def _trtp_names(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "trtp"}


def _class_bases(wheel, module: str) -> dict[str, list[str]]:
    tree = _parse(wheel.source(module))
    return {n.name: [ast.unparse(b) for b in n.bases] for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def _accepts(name: str, accepted: set[str], bases: dict[str, list[str]]) -> bool:
    """Whether class `name` is one of `accepted` or derives from one (per the wheel's class tree)."""
    return name in accepted or any(_accepts(b, accepted, bases) for b in bases.get(name, []))


def test_no_postponed_annotations_in_the_plugin_module() -> None:
    """tensorrt.plugin inspects annotation objects; strings (PEP 563) would fail its issubclass checks."""
    tree = ast.parse(PLUGIN_SOURCE)
    futures = [a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__" for a in n.names]
    assert "annotations" not in futures


def test_plugin_functions_follow_the_rules_of_validate_py(tensorrt_wheel) -> None:
    wheel = tensorrt_wheel(TRT_11_4)
    validate = _parse(wheel.source("plugin/_validate.py"))
    bases = _class_bases(wheel, "plugin/_tensor.py")
    functions = _plugin_functions()
    assert set(functions) == {"register", "autotune", "impl", "aot_impl"}

    # register (_parse_register_inputs / _parse_register_return): every argument annotated, no
    # defaults, positional-or-keyword, TensorDescs first; returns TensorDesc or tuple of them.
    parse_inputs = _function(validate, "_parse_register_inputs")
    messages = " ".join(_strings(parse_inputs))
    for rule in ("does not have a type annotation", "has a default value", "TensorDescs args should come first"):
        assert rule in messages, f"_validate.py no longer states the rule {rule!r}"
    register = functions["register"]
    args = register.args
    assert not (args.vararg or args.kwarg or args.posonlyargs or args.kwonlyargs or args.defaults)
    accepted_inputs = _issubclass_targets(parse_inputs)
    tensors = []
    for arg in args.args:
        assert arg.annotation is not None, f"register: {arg.arg} has no annotation"
        assert isinstance(arg.annotation, ast.Attribute) and _accepts(arg.annotation.attr, accepted_inputs, bases)
        tensors.append(arg.arg)
    assert tensors == ["x", "codebook"]
    returned = register.returns
    assert isinstance(returned, ast.Attribute) and _accepts(
        returned.attr, _issubclass_targets(_function(validate, "_parse_register_return")), bases
    )
    disallowed = next(
        {e.value for e in n.value.elts} for n in validate.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DISALLOWED_ATTR_NAMES"
    )
    assert not set(tensors) & disallowed

    # impl / autotune / aot_impl: the tensors, then the fixed tail each validator builds its
    # expected schema from; annotations only of classes the validator accepts.
    for decorator, validator, tensor_class in (
        ("impl", "_validate_impl", "Tensor"),
        ("autotune", "_validate_autotune", "TensorDesc"),
        ("aot_impl", "_validate_aot_impl", "TensorDesc"),
    ):
        node = _function(validate, validator)
        function = functions[decorator]
        names = [a.arg for a in function.args.args]
        tail = _schema_tail(node)
        if decorator == "impl":  # "tactic" is optional there and appended after the tail
            assert ", tactic)" in _strings(node)
            names = [n for n in names if n != "tactic"]
        assert names == tensors + tail, f"{decorator}: {names} != {tensors + tail}"
        accepted = _issubclass_targets(node)
        assert tensor_class in accepted
        if {"stream", "tactic"} & set(tail):
            assert "int" in accepted
        for arg in function.args.args:
            text = _annotation(arg.annotation)
            if arg.arg in tensors:
                assert text == f"tensorrt.plugin.{tensor_class}", f"{decorator}: {arg.arg}: {text}"
            elif arg.arg == "outputs":
                assert text == f"tuple[tensorrt.plugin.{tensor_class}]", f"{decorator}: outputs: {text}"
            else:
                assert text == "int", f"{decorator}: {arg.arg} must be an int, is {text}"

    assert _annotation(functions["impl"].returns) == "None"
    autotune_return = functions["autotune"].returns
    assert _annotation(autotune_return) == "list[tensorrt.plugin.AutoTuneCombination]"
    assert "AutoTuneCombination" in _issubclass_targets(_function(validate, "_validate_autotune"))

    # aot_impl's return annotation: the wheel's own expected_return_schema, word for word.
    aot = _function(validate, "_validate_aot_impl")
    schema = next(s for s in _strings(aot) if s.startswith("tuple[") and "KernelLaunchParams" in s)
    assert _annotation(functions["aot_impl"].returns) == schema
    assert {"KernelLaunchParams", "SymExprs"} <= _issubclass_targets(aot)
    assert _accepts("SymIntExprs", {"SymExprs"}, bases)


def test_every_tensorrt_plugin_name_used_is_public_and_guarded(tensorrt_wheel) -> None:
    """Each trtp.X the plugin uses is exported by tensorrt.plugin 11.4; AOT-only ones sit behind
    the AOT guard (KernelLaunchParams exists only `if IS_AOT_ENABLED`)."""
    wheel = tensorrt_wheel(TRT_11_4)
    public, aot_only = {"op"}, set()
    for module in ("plugin/_lib.py", "plugin/_tensor.py", "plugin/_autotune.py", "plugin/_top_level.py"):
        tree = _parse(wheel.source(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "IS_AOT_ENABLED" in ast.unparse(node.test):
                aot_only |= {n.name for n in ast.walk(node) if isinstance(n, ast.ClassDef | ast.FunctionDef)}
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and any(
                "public_api" in ast.unparse(d) for d in node.decorator_list
            ):
                public.add(node.name)
    functions = _plugin_functions()
    jit_used = set().union(*(_trtp_names(functions[d]) for d in ("register", "autotune", "impl")))
    jit_used |= {d for d in ("register", "autotune", "impl")}
    aot_used = _trtp_names(functions["aot_impl"]) | {"aot_impl"}
    assert jit_used | aot_used <= public, f"not public in 11.4: {(jit_used | aot_used) - public}"
    assert jit_used - {"op"} <= set(trt_plugin._JIT_API)
    assert aot_used - jit_used <= set(trt_plugin._AOT_API)
    assert "KernelLaunchParams" in aot_only and "KernelLaunchParams" in trt_plugin._AOT_API
    assert not aot_only & set(trt_plugin._JIT_API)


def test_aot_arrived_in_tensorrt_10_9(tensorrt_wheel) -> None:
    """The version table, read from the 10.8 and 10.9 bindings: aot_impl and KernelLaunchParams
    first ship in 10.9, as do the PREFER_*_PYTHON_PLUGINS network flags."""
    for requirement, has_aot in ((TRT_10_8, False), (TRT_10_9, True), (TRT_11_4, True)):
        wheel = tensorrt_wheel(requirement)
        version = requirement.split("==")[1]
        lib = _parse(wheel.source("plugin/_lib.py"))
        tensor = _parse(wheel.source("plugin/_tensor.py"))
        defines_aot = any(isinstance(n, ast.FunctionDef) and n.name == "aot_impl" for n in ast.walk(lib))
        defines_params = any(isinstance(n, ast.ClassDef) and n.name == "KernelLaunchParams" for n in ast.walk(tensor))
        assert defines_aot is has_aot and defines_params is has_aot, version
        assert wheel.has_name("PREFER_AOT_PYTHON_PLUGINS") is has_aot, version
        assert trt_plugin.supports_aot(version) is has_aot, version
        assert trt_plugin.supports_plugins(version)


def _tensorrt_generator(wheel):
    """TensorRT's own `_gen_onesided_combinations`, compiled from the wheel's source at test time."""
    tree = _parse(wheel.source("plugin/_autotune.py"))
    function = _function(tree, "_gen_onesided_combinations")
    namespace = {"builtins": builtins, "copy": copy}
    exec(compile(ast.Module([function], type_ignores=[]), "tensorrt/plugin/_autotune.py", "exec"), namespace)  # noqa: S102
    return namespace["_gen_onesided_combinations"]


GRAMMAR_CASES = [
    trt_plugin.AUTOTUNE_IO_TYPES,
    "FP32|FP16, FP32|FP16, INT64",
    "FP32*FP16, FP32|FP16, FP32|FP16",  # '*' and '|' in different columns: allowed
    "FP32|FP16, FP32*FP16*BF16, INT64|INT32",
    "FP32*FP16, FP32*FP16, INT64*INT32",
    "FP32, FP16, INT64",
    "FP32|FP16|BF16, FP32|FP16|BF16, INT64",
    "FP32|FP16, FP32|FP16|BF16, INT64",  # dependent lengths differ: refused
    "FP32|FP16*BF16, FP32, INT64",  # both separators in one column: refused
    "BF16|FP32, FP32|FP16, INT32*INT64",
]


@pytest.mark.parametrize("io_types", GRAMMAR_CASES)
def test_type_grammar_matches_tensorrt_generator(tensorrt_wheel, io_types: str) -> None:
    generate = _tensorrt_generator(tensorrt_wheel(TRT_11_4))
    columns = [column.strip() for column in io_types.split(",")]  # as AutoTuneCombination splits
    try:
        expected = [tuple(trt_plugin._TYPE_NAMES[t] for t in combo) for combo in generate(columns)]
    except ValueError:
        with pytest.raises(ValueError):
            trt_plugin.supported_type_combinations(io_types)
        return
    assert trt_plugin.supported_type_combinations(io_types) == expected


def test_type_names_are_tensorrt_datatype_names(tensorrt_wheel) -> None:
    """FP32/FP16 are _str_to_data_type's special cases; every other name is a trt.DataType member."""
    wheel = tensorrt_wheel(TRT_11_4)
    to_dtype = _function(_parse(wheel.source("plugin/_utils.py")), "_str_to_data_type")
    assert {"FP32", "FP16", "FLOAT", "HALF"} <= _strings(to_dtype) | {
        n.attr for n in ast.walk(to_dtype) if isinstance(n, ast.Attribute)
    }
    for name in set(trt_plugin._TYPE_NAMES) - {"FP32", "FP16"}:
        assert wheel.has_name(name), name


def test_dtype_map_covers_tensorrt_11_4_datatypes(tensorrt_wheel) -> None:
    wheel = tensorrt_wheel(TRT_11_4)
    for name in trt_backend.TORCH_DTYPES:
        assert wheel.has_name(name), f"{name} is not a TensorRT 11.4 DataType name"
    for name in ("INT4", "FP4", "E8M0"):  # DataTypes with no torch buffer: refused, not read as float32
        assert wheel.has_name(name) and name not in trt_backend.TORCH_DTYPES


def test_network_flags_exist_and_strongly_typed_is_deprecated_in_11(tensorrt_wheel) -> None:
    wheel = tensorrt_wheel(TRT_11_4)
    assert any("Deprecated in TensorRT 11.0. Strongly typed mode is always enabled" in s for s in wheel.so_strings())
    for plugin in trt_backend.PLUGIN_CHOICES:
        for name in trt_backend.network_flag_names("11.4.0.106", plugin) + trt_backend.network_flag_names("10.9", plugin):
            assert wheel.has_name(name), name
    assert "STRONGLY_TYPED" not in trt_backend.network_flag_names("11.4.0.106", "jit")


BUILDER_AND_RUNTIME_CALLS = [
    "Logger", "Builder", "create_network", "OnnxParser", "parse_from_file", "get_error", "num_errors",
    "create_builder_config", "clear_flag", "TF32", "create_optimization_profile", "set_shape",
    "add_optimization_profile", "build_serialized_network", "Runtime", "deserialize_cuda_engine",
    "get_tensor_dtype", "create_execution_context", "set_input_shape", "set_tensor_address",
    "get_tensor_shape", "execute_async_v3", "NetworkDefinitionCreationFlag", "BuilderFlag",
]


def test_builder_and_runtime_calls_exist_in_tensorrt_11_4(tensorrt_wheel) -> None:
    wheel = tensorrt_wheel(TRT_11_4)
    source = Path(inspect.getfile(trt_backend)).read_text()
    for name in BUILDER_AND_RUNTIME_CALLS:
        assert name in source, f"{name} is no longer used: update this list"
        assert wheel.has_name(name), f"TensorRT 11.4 has no {name}"
    called = {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
    trt_like = {"create_network", "parse_from_file", "build_serialized_network", "deserialize_cuda_engine",
                "execute_async_v3", "set_input_shape", "set_tensor_address", "get_tensor_shape"}
    assert trt_like <= called


def test_grammar_generator_is_the_product_for_star_columns(tensorrt_wheel) -> None:
    """TensorRT's generator, for '*' columns alone, is the cartesian product (in its own order)."""
    generate = _tensorrt_generator(tensorrt_wheel(TRT_11_4))
    combos = generate(["FP32*FP16", "FP32*FP16", "INT64"])
    assert sorted(map(tuple, combos)) == sorted(itertools.product(["FP32", "FP16"], ["FP32", "FP16"], ["INT64"]))
