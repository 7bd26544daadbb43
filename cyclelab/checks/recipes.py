"""How a check's objects are made, so that the learner's process can make its own copy.

When a workshop grades a notebook, the learner's function runs in a process of its own
(:mod:`cyclelab.workshop.learner`) and only values cross (:mod:`cyclelab.workshop.wire`). A model, an engine,
an optimizer or a gradient function cannot travel by value, so a check names how it made one:
``made(obj, "module:function", *args, path=...)``; the learner's process calls the same function with the
same arguments (which may name other made objects) and picks ``path`` out of its result. A layer of a made
model, or the model of a made ``Loaded``, is found by its place in it. In a notebook this costs a dict entry.
"""

from __future__ import annotations

import importlib
import weakref

import torch

_MADE: dict[int, tuple[weakref.ref, dict]] = {}


def made(obj, factory: str, *args, path: tuple = (), **kwargs):
    """Remember that ``obj`` is ``factory(*args, **kwargs)`` picked by ``path`` (items and attributes); ``obj``."""
    try:
        key = id(obj)
        _MADE[key] = (weakref.ref(obj, lambda _, key=key: _MADE.pop(key, None)), _recipe(factory, args, kwargs, path))
    except TypeError:  # an object no weak reference can name is not remembered
        pass
    return obj


def _recipe(factory: str, args, kwargs, path) -> dict:
    return {"factory": factory, "args": list(args), "kwargs": dict(kwargs), "path": list(path)}


def recipe_of(obj) -> dict | None:
    """How ``obj`` was made: its own recipe, else its place in a made object (a submodule, an attribute)."""
    entry = _MADE.get(id(obj))
    if entry and entry[0]() is obj:
        return entry[1]
    if not isinstance(obj, torch.nn.Module):
        return None
    for ref, recipe in list(_MADE.values()):
        root = ref()
        if isinstance(root, torch.nn.Module):
            roots = [((), root)]
        else:
            attrs = getattr(root, "__dict__", {})
            roots = [((a,), v) for a, v in attrs.items() if isinstance(v, torch.nn.Module)]
        for prefix, module in roots:
            for name, sub in module.named_modules():
                if sub is obj:
                    steps = [["attr", a] for a in prefix] + ([["module", name]] if name else [])
                    return {**recipe, "path": recipe["path"] + steps}
    return None


def remake(recipe: dict, resolve):
    """The object a recipe names, made here; ``resolve`` decodes its arguments (references included)."""
    module, _, name = recipe["factory"].partition(":")
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    obj = target(*resolve(recipe["args"]), **resolve(recipe["kwargs"]))
    for step in recipe["path"]:
        kind, key = step if isinstance(step, list) else ("item", step)
        obj = {"item": lambda o, k: o[k], "attr": getattr, "module": lambda o, k: o.get_submodule(k)}[kind](obj, key)
    return obj


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (the checks try each block in both precisions)."""
    import copy

    return copy.deepcopy(model).double()
