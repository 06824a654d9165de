"""A restricted unpickler for torch files pickling whole modules (task_vectors' ``finetuned.pt``, ``head_<Task>.pt``).

``torch.load(weights_only=True)`` refuses these files because their globals name the authors' classes, and a plain
``torch.load`` would import and run whatever the file names. This module sits between the two: torch's own reader
still loads the storages, but every global outside a small allowlist of tensor-rebuild functions resolves to an inert
stand-in class, so nothing named in the file is imported or called. Globals that could only serve to run code
(``os.system``, ``builtins.eval``, ``subprocess.*``, ...) are refused outright, so a hostile file is reported instead of
being loaded as an odd-looking module. Stand-ins keep their pickled state; :func:`collect_tensors` walks
``_parameters`` / ``_buffers`` / ``_modules`` to dotted tensor names, like ``state_dict()``.

Use: ``load_file(path)``, which calls ``torch.load(path, pickle_module=<this module>, weights_only=False)``: torch
subclasses :class:`Unpickler` (zip format) or calls :func:`load` (legacy format) with it.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import itertools
import os
import pickle
import sys
import zipfile
import torch

# Nothing unpickled may be larger than the file it came from: an element, a byte and a storage byte each need at
# least a byte of the file, except when a constructor is handed a count (``bytearray(2**31)``,
# ``set(range(10**9))``) or a storage claims a size: those are checked against this budget, the file's size.
_BUDGET = contextvars.ContextVar("unpickle_budget", default=1 << 26)
_SOURCE = contextvars.ContextVar("unpickle_source", default="the pickle")


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names a global that exists to run code."""


_TENSOR_REBUILDERS = {
    ("torch._utils", name): getattr(torch._utils, name)
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state")
    if hasattr(torch._utils, name)
}


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses pickle through this; keep the plain tensor and never touch the (stand-in) subclass.
    if func not in _TENSOR_REBUILDERS.values():
        raise UnsafePickle(f"tensor rebuilt by {getattr(func, '__qualname__', func)!r}, not a tensor rebuild function")
    return func(*args)


def _size_of(arg) -> int:
    """How many items or bytes a constructor would make from its first argument (a count or an iterable)."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg
    try:
        return len(arg)
    except OverflowError:  # len(range(10**30))
        return sys.maxsize
    except TypeError:
        return -1  # an iterator: counted while it is consumed


def bounded(constructor, name: str):
    """``constructor`` refusing to build more items or bytes than the budget (the file's size)."""

    def make(*args):
        if args:
            budget, size = _BUDGET.get(), _size_of(args[0])
            if size < 0:
                items = list(itertools.islice(iter(args[0]), budget + 1))
                size, args = len(items), (items, *args[1:])
            if size > budget:
                raise UnsafePickle(f"{_SOURCE.get()}: the pickle asks for {name} of {size} items or bytes, more "
                                   f"than the file's {budget} bytes could hold (refused before allocating)")
        return constructor(*args)

    make.__qualname__ = make.__name__ = name
    return make


_SAFE_BUILTINS = {
    **{name: getattr(__import__("builtins"), name) for name in ("slice", "complex", "range")},
    **{name: bounded(getattr(__import__("builtins"), name), name) for name in ("set", "frozenset", "bytearray",
                                                                                  "bytes")},
}

_ALLOWED = {
    **_TENSOR_REBUILDERS,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): bounded(collections.OrderedDict, "OrderedDict"),
    ("torch", "Size"): bounded(torch.Size, "torch.Size"),
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): __import__("_codecs").encode,  # how protocol 2 pickles bytes
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    **{("builtins", name): obj for name, obj in _SAFE_BUILTINS.items()},
    **{("__builtin__", name): obj for name, obj in _SAFE_BUILTINS.items()},
}

# Globals that exist to run commands, import, evaluate code, open files or sockets, or load further pickles: a
# checkpoint naming one is refused. (Nothing else named in a file runs either: it becomes a stand-in.)
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pickle", "_pickle", "dill",
    "marshal", "ctypes", "code", "codeop", "pty", "multiprocessing", "webbrowser", "types", "operator", "builtins",
    "__builtin__", "io", "_io", "tempfile", "signal", "asyncio", "threading", "_thread", "inspect", "pdb",
    "bdb", "timeit", "commands", "popen2", "urllib", "http", "ftplib", "smtplib", "requests", "shelve", "zipimport",
    "cProfile", "profile", "trace",
}
_DANGEROUS_PREFIXES = ("torch.load", "torch.save", "torch.hub", "torch.jit", "torch.serialization", "torch.package",
                       "torch.storage._load_from_bytes", "torch.utils.cpp_extension", "torch._C._jit", "torch.ops",
                       "torch.distributed", "numpy.load", "numpy.lib.npyio", "numpy.testing", "numpy.f2py",
                       "numpy.distutils", "numpy.ctypeslib")


def is_dangerous(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    return (module.split(".")[0] in _DANGEROUS_MODULES
            or any(full == p or full.startswith(p + ".") for p in _DANGEROUS_PREFIXES))


class StandIn:
    """An inert placeholder for a pickled class or function: accepts any construction, keeps the pickled state."""

    pickled_global = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_pickled_args"] = args

    def __setstate__(self, state):
        self.__dict__["_pickled_state"] = state

    # dict and list subclasses are rebuilt item by item (SETITEMS / APPENDS opcodes)
    def __setitem__(self, key, value):
        self.__dict__.setdefault("_pickled_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_pickled_list", []).append(value)

    def extend(self, values):
        for value in values:
            self.append(value)

    def pickled_dict(self) -> dict:
        """The instance __dict__ as pickled (state may be a dict or a (dict, slots) pair)."""
        state = self.__dict__.get("_pickled_state")
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] if isinstance(state[1], dict) else {})
            return merged
        return state if isinstance(state, dict) else {}

    def __repr__(self):
        return f"<stand-in for {self.pickled_global}>"


def _storage_bytes(saved_id) -> int:
    """Bytes a torch storage reference (``('storage', type, key, location, numel)``) asks torch to allocate."""
    if not (isinstance(saved_id, tuple) and len(saved_id) == 5):
        return 0
    storage_type, numel = saved_id[1], saved_id[4]
    itemsize = getattr(getattr(storage_type, "dtype", None), "itemsize", 1)
    return numel * itemsize if isinstance(numel, int) else 0


class Unpickler(pickle.Unpickler):
    """Resolves the allowlist to real objects, dangerous globals to an error and everything else to a stand-in."""

    _stand_ins: dict[tuple[str, str], type] = {}

    # torch assigns its storage loader here after construction; wrap it so a storage claiming more bytes than
    # the file holds is refused before torch allocates it.
    @property
    def persistent_load(self):
        raise AttributeError("persistent_load")

    @persistent_load.setter
    def persistent_load(self, function):
        def guarded(saved_id):
            size, budget = _storage_bytes(saved_id), _BUDGET.get()
            if size > budget:
                raise UnsafePickle(f"{_SOURCE.get()}: a tensor storage of {size} bytes, more than the file's "
                                   f"{budget} bytes (refused before allocating)")
            return function(saved_id)

        pickle.Unpickler.persistent_load.__set__(self, guarded)

    def find_class(self, module, name):
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        if is_dangerous(module, name):
            raise UnsafePickle(f"the pickle asks for {module}.{name}, which can run code")
        cls = self._stand_ins.get(key)
        if cls is None:
            cls = type(str(name).split(".")[-1], (StandIn,), {"pickled_global": f"{module}.{name}"})
            self._stand_ins[key] = cls
        return cls


def load(file, **kwargs):
    """pickle.load's signature, restricted (torch's legacy format reader calls it)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs):
    import io

    return load(io.BytesIO(data), **kwargs)


def is_torchscript(path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def load_file(path) -> object:
    """Unpickle a torch file without running anything it names. Raises pickle.UnpicklingError (UnsafePickle for
    hostile globals), RuntimeError or OSError for files torch cannot read."""
    if is_torchscript(path):
        # torch.load would hand it to torch.jit.load, which runs its code.
        raise pickle.UnpicklingError("a TorchScript archive (torch.jit.save), not a pickled checkpoint")
    with _budget_of(path):
        return torch.load(path, map_location="cpu", pickle_module=sys.modules[__name__], weights_only=False)


@contextlib.contextmanager
def _budget_of(path):
    size, source = _BUDGET.set(max(os.path.getsize(path), 1 << 16)), _SOURCE.set(str(path))
    try:
        yield
    finally:
        _BUDGET.reset(size)
        _SOURCE.reset(source)


def collect_tensors(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], set[str]]:
    """Dotted names -> tensors reachable through mappings and stand-in modules, and the stand-in classes met.

    Modules contribute ``_parameters`` and persistent ``_buffers`` and recurse into ``_modules``, as ``state_dict``;
    any other object's attributes (preprocess transforms, cache dirs) are not searched for tensors.
    """
    tensors, classes, seen = {}, set(), set()

    def walk(node, prefix):
        if isinstance(node, torch.Tensor):
            if prefix:
                tensors[prefix[:-1]] = node
            return
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, (str, int)):
                    walk(value, f"{prefix}{key}.")
        elif isinstance(node, StandIn):
            classes.add(type(node).pickled_global)
            state = node.pickled_dict()
            skip = set(state.get("_non_persistent_buffers_set") or ())
            for group in ("_parameters", "_buffers"):
                for name, value in dict(state.get(group) or {}).items():
                    if isinstance(value, torch.Tensor) and not (group == "_buffers" and name in skip):
                        tensors[f"{prefix}{name}"] = value
            for name, child in dict(state.get("_modules") or {}).items():
                if child is not None:
                    walk(child, f"{prefix}{name}.")
            if "_pickled_items" in node.__dict__:
                walk(node.__dict__["_pickled_items"], prefix)

    walk(obj, prefix)
    return tensors, classes
