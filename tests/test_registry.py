"""The one registry helper behind every pluggable part: registration, duplicates, unknown names."""

from __future__ import annotations

import pytest

from cdc.criteria import CRITERIA, GRID_DISCRIMINANTS, WEIGHT_CRITERIA
from cdc.discriminants import DISCRIMINANTS
from cdc.errors import InputError
from cdc.inference import INFERENCE_FORMS
from cdc.models import MODELS
from cdc.pruning import BUDGETS
from cdc.registry import Registry
from cdc.sources import DATASETS

REGISTRIES = {
    "model": MODELS,
    "dataset": DATASETS,
    "discriminant": DISCRIMINANTS,
    "criterion": CRITERIA,
    "grid discriminant": GRID_DISCRIMINANTS,
    "weight criterion": WEIGHT_CRITERIA,
    "budget": BUDGETS,
    "inference form": INFERENCE_FORMS,
}


def test_registration_by_decorator_and_a_duplicate_name_is_an_error():
    things: Registry[int] = Registry("thing")

    @things.register("f")
    def f() -> int:
        return 1

    assert things.get("f") is f and list(things) == ["f"] and "f" in things and len(things) == 1
    with pytest.raises(ValueError, match="'f' is registered twice"):
        things.add("f", f)


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registry_is_the_helper_and_an_unknown_name_lists_the_known_ones(kind):
    registry = REGISTRIES[kind]
    assert isinstance(registry, Registry) and registry.kind == kind and len(registry) >= 1
    with pytest.raises(InputError) as err:
        registry.get("no-such-name")
    assert f"unknown {kind} 'no-such-name'" in str(err.value)
    assert all(name in str(err.value) for name in registry)
