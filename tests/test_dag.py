"""The stage graph: order, reachability, cycles, unknown references."""

from __future__ import annotations

import pytest

from pipeline.engine import dag
from pipeline.engine.recipe import RecipeError, check_references, find_cycle, parse_recipe

from conftest import TINY_MODEL


def recipe(stage_map):
    return parse_recipe({"name": "t", "model": TINY_MODEL, "stages": stage_map})


@pytest.fixture
def graph(fake_stages):
    # listed out of order on purpose: c reads b, b reads a and is gated by g (which reads a)
    return recipe(
        {
            "c": {"type": "make", "src": "b"},
            "e": {"type": "make", "src": "model"},
            "b": {"type": "make", "src": "a", "when": "g"},
            "g": {"type": "gate", "src": "a"},
            "a": {"type": "make"},
        }
    )


def test_topological_order_puts_inputs_first_and_keeps_file_order(graph):
    assert dag.topological_order(graph) == ["e", "a", "g", "b", "c"]
    assert dag.dependencies(graph, "b") == ["g", "a"]  # `when` is a field of every stage, declared first
    assert dag.dependencies(graph, "e") == []  # "model" is the base model, not a stage


def test_downstream_and_upstream(graph):
    assert dag.downstream(graph, "a") == {"g", "b", "c"}
    assert dag.downstream(graph, "g") == {"b", "c"}
    assert dag.downstream(graph, "c") == set()
    assert dag.upstream(graph, "c") == {"b", "a", "g"}
    assert dag.upstream(graph, "e") == set()


def test_cycles_are_found_and_reported(fake_stages):
    with pytest.raises(RecipeError) as e:
        recipe(
            {
                "a": {"type": "make", "src": "c"},
                "b": {"type": "make", "src": "a"},
                "c": {"type": "make", "src": "b"},
                "d": {"type": "make"},
            }
        )
    assert e.value.errors == [("stages", "cycle a -> c -> b -> a")]
    from fake_make import Config

    configs = {"x": Config(src="y"), "y": Config(src="x"), "z": Config()}
    assert find_cycle(configs) == ["x", "y", "x"]
    assert find_cycle({"x": Config(src="model"), "y": Config(src="x")}) is None


def test_unknown_references(fake_stages):
    from fake_make import Config

    configs = {"teacher": Config(), "student": Config(src="techer"), "other": Config(when="student")}
    assert check_references(configs) == [
        ("stages.student.src", "no stage named 'techer' (did you mean 'teacher'?)"),
        ("stages.other.when", "'student' is a make stage, not a gate"),
    ]
    assert check_references({"a": Config(when="model")}) == [
        ("stages.a.when", "must name a gate stage, not the base model")
    ]
