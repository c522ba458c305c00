"""The pieces of ``make mutate`` that decide which tests a mutant runs (tests/mutate_runner.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mutate
import mutate_runner


def test_changed_lines_are_the_pristine_lines_a_mutant_touches():
    pristine = "a = 1\nif a < 2:\n    b = 3\nc = 4\n"
    assert mutate_runner.changed_lines(pristine, pristine.replace("a < 2", "a > 2")) == [2]
    assert mutate_runner.changed_lines(pristine, pristine.replace("b = 3", "b = 4").replace("c = 4", "c = 5")) == [3, 4]
    assert mutate_runner.changed_lines(pristine, "a = 1\nif a < 2:\n    b = 3\n") == [4]  # a deleted line
    assert mutate_runner.changed_lines(pristine, pristine) == []


def test_select_tests_takes_the_covering_tests_quickest_first_else_the_fallback():
    covmap = {"2": ["t.py::slow", "t.py::b"], "3": ["t.py::a"]}
    seconds = {"t.py::slow": 9.0, "t.py::a": 0.1, "t.py::b": 0.2}
    assert mutate_runner.select_tests(covmap, [2, 3], ["tests/x"], seconds) == ["t.py::a", "t.py::b", "t.py::slow"]
    # a line no test's run executed (module level: a def line, a default, a constant): every test
    # that executed the module
    assert mutate_runner.select_tests(covmap, [2, 7], ["tests/x"], seconds) == ["t.py::a", "t.py::b", "t.py::slow"]
    assert mutate_runner.select_tests(covmap, [], ["tests/x"]) == ["tests/x"]
    assert mutate_runner.select_tests({}, [3], ["tests/x"]) == ["tests/x"]  # nothing on record


def test_durations_map_junit_cases_to_node_ids(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.routers.test_contract" name="test_a[1-2]" time="0.5"/>'
        '<testcase classname="tests.test_architecture" name="test_b" time="0.25"/>'
        "</testsuite></testsuites>"
    )
    assert mutate._durations(junit) == {
        "tests/routers/test_contract.py::test_a[1-2]": 0.5,
        "tests/test_architecture.py::test_b": 0.25,
    }


def test_every_router_module_is_in_scope():
    routers = Path(mutate.REPO, "routers")
    rules = {p.stem for p in routers.glob("*.py")} - {"builtin", "example_plugin", "options", "registry", "validate"}
    assert rules <= set(mutate.SCOPE), f"router modules outside make mutate: {sorted(rules - set(mutate.SCOPE))}"
