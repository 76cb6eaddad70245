"""Interpreting an untrusted pickle with a bound on the work and memory it may cost, building no real object.

A checkpoint's pickle is input from whoever wrote the file. Two tiny pickles show why reading one needs
limits even when no code runs: `x = []`, then sixty times `x = [x, x]` is 1.3 KB and 2^60 objects to
anyone who walks it; a dict whose keys are tuples nested the same way costs 2^60 steps to *build*, since
a tuple's hash walks it (and torch's weights-only unpickler builds dicts exactly so). This module runs
Python's own pure-Python unpickler (every opcode of every protocol, as the stdlib defines them), charging
each opcode, each hash, each item moved and each call to a `Budget` before it runs: the work done is at
most the budget, and a pickle that would need more raises `TooComplex`. The charges mirror what torch's
weights-only loader does with the same stream, so a pickle that fits here is cheap there too.

Globals are never imported: `find_class` returns stand-ins (see ckpt.formats). Limits are in
docs/reliability.md, "Hostile files".
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# pickle._Unpickler is the stdlib's reference implementation of the pickle machine (the C one is its
# accelerated twin): subclassing it is the only way to see each opcode before it runs.
_Base: Any = pickle._Unpickler  # type: ignore[attr-defined]

DEPTH_LIMIT = 100  # containers inside containers: real checkpoints nest a few levels, Lightning's configs ~10


class TooComplex(Exception):
    """The pickle needs more work, memory or nesting than its budget allows; `what` says which."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


@dataclass(slots=True)
class Budget:
    """What reading one pickle may still cost: `work` in steps (an opcode, a visit, an item hashed or
    moved), `memory` in estimated bytes of Python objects."""

    work: int
    memory: int

    @classmethod
    def for_pickle(cls, stored_bytes: int) -> Budget:
        """The budget of a pickle that takes `stored_bytes` in its file: a fixed allowance, plus a share
        proportional to those bytes (a real pickle costs about 0.5 steps and 30 bytes of objects per byte)."""
        return cls(work=250_000 + 2 * stored_bytes, memory=64 * 2**20 + 64 * stored_bytes)

    def spend(self, work: int, memory: int = 0) -> None:
        self.work -= work
        self.memory -= memory
        if self.work < 0:
            raise TooComplex("more work than its size allows (a pickle that walks shared objects again and again?)")
        if self.memory < 0:
            raise TooComplex("more memory than its size allows")


# Estimated bytes of Python objects each opcode adds (object, pointer, memo or stack slot); 64 otherwise.
_SET_OPS = {pickle.EMPTY_SET[0], pickle.FROZENSET[0]}  # type: ignore[attr-defined]
_DICT_OPS = {pickle.EMPTY_DICT[0], pickle.DICT[0]}
_MARK_OPS = {  # opcodes that take every item since the last MARK
    pickle.APPENDS[0],
    pickle.SETITEMS[0],
    pickle.ADDITEMS[0],  # type: ignore[attr-defined]
    pickle.TUPLE[0],
    pickle.LIST[0],
    pickle.DICT[0],
    pickle.FROZENSET[0],  # type: ignore[attr-defined]
    pickle.OBJ[0],
    pickle.INST[0],
    pickle.POP_MARK[0],
}
_SIZED = (str, bytes, bytearray)
_STRING_OPS = {
    op[0]
    for op in (
        pickle.STRING,
        pickle.BINSTRING,
        pickle.SHORT_BINSTRING,
        pickle.UNICODE,
        pickle.BINUNICODE,
        pickle.BINBYTES,
        pickle.SHORT_BINBYTES,
        pickle.SHORT_BINUNICODE,  # type: ignore[attr-defined]
        pickle.BINUNICODE8,  # type: ignore[attr-defined]
        pickle.BINBYTES8,  # type: ignore[attr-defined]
        pickle.BYTEARRAY8,  # type: ignore[attr-defined]
    )
}


def _charged(op: int, run: Callable[[Any], None]) -> Callable[[Any], None]:
    def step(self: BoundedUnpickler) -> None:
        self._before(op)
        run(self)
        if op in _STRING_OPS:
            top = self.stack[-1]  # a string costs its length (and a pass to decode)
            self.budget.spend(len(top) >> 6, len(top))

    return step


class BoundedUnpickler(_Base):  # type: ignore[misc]
    """An unpickler that charges `budget` for everything it does and refuses to nest deeper than `depth`.

    Subclasses give `find_class` and `persistent_load` (stand-ins: nothing is imported) and charge their
    own calls with `charge_call`.
    """

    def __init__(self, data: bytes, budget: Budget, depth: int = DEPTH_LIMIT):
        import io

        super().__init__(io.BytesIO(data))
        self.budget = budget
        self.depth = depth
        self._collisions: dict[tuple[int, int], int] = {}

    # --- charging -------------------------------------------------------------------------------------

    def _before(self, op: int) -> None:
        spend = self.budget.spend
        if op in _MARK_OPS:
            items = self.stack  # since the last MARK
            spend(1 + len(items), 64 + 16 * len(items))
            parent = self.metastack[-1] if self.metastack else []
            if op == pickle.SETITEMS[0] and parent:
                self.charge_keys(parent[-1], items[0::2])
            elif op == pickle.DICT[0]:
                self.charge_keys(None, items[0::2])
            elif op == pickle.ADDITEMS[0] and parent:  # type: ignore[attr-defined]
                self.charge_keys(parent[-1], items)
            elif op == pickle.FROZENSET[0]:  # type: ignore[attr-defined]
                self.charge_keys(None, items)
        elif op == pickle.SETITEM[0] and len(self.stack) >= 3:
            spend(1, 64)
            self.charge_keys(self.stack[-3], [self.stack[-2]])
        elif op == pickle.REDUCE[0] and len(self.stack) >= 2:
            # checked here, not left to Python: its error for `func(*args)` with a non-callable func or
            # non-tuple args formats the func, and the str of a shared nested structure takes 2**n steps
            if not callable(self.stack[-2]) or not isinstance(self.stack[-1], tuple):
                raise pickle.UnpicklingError("REDUCE of something that is not a call")
            spend(1, 64)
        elif op == pickle.BUILD[0] and len(self.stack) >= 2:
            state = self.stack[-1]
            spend(1, 64)
            if not hasattr(self.stack[-2], "__setstate__"):  # the state's items become attributes
                for part in state if isinstance(state, tuple) else (state,):
                    if isinstance(part, dict):
                        spend(len(part), 16 * len(part))
                        self.charge_keys(None, list(part))
        else:
            spend(1, 232 if op in _SET_OPS else 100 if op in _DICT_OPS else 64)

    def charge_keys(self, target: Any, keys: list[Any]) -> None:
        """Charge hashing `keys` into `target` (a dict or set; None for a new one): each key's hash walks it,
        and keys whose hashes collide are compared with each other (crafted ints all hash alike)."""
        for key in keys:
            self.charge_hash(key)
            try:
                h = hash(key)
            except TypeError:
                continue  # unhashable: the insert fails at once
            slot = (id(target), h)
            seen = self._collisions.get(slot, 0)
            if seen:
                self.budget.spend(seen)
            self._collisions[slot] = seen + 1

    def charge_hash(self, obj: Any, level: int = 0) -> None:
        """Charge what hash(obj) costs: a tuple hashes every element each time (str and frozenset cache theirs)."""
        if type(obj) is tuple:
            if level > self.depth:
                raise TooComplex(f"tuples nested more than {self.depth} deep")
            self.budget.spend(1 + len(obj))
            for x in obj:
                if type(x) is tuple:
                    self.charge_hash(x, level + 1)
        elif isinstance(obj, int) and not isinstance(obj, bool):
            self.budget.spend(obj.bit_length() >> 6)

    def charge_call(self, args: Any) -> None:
        """Charge a call that may iterate each of `args` once (OrderedDict(pairs), torch.Size(list))."""
        for arg in args if isinstance(args, tuple | list) else (args,):
            if isinstance(arg, _SIZED):
                self.budget.spend(1 + (len(arg) >> 6))
            elif isinstance(arg, tuple | list | dict | set | frozenset):
                self.budget.spend(1 + len(arg), 16 * len(arg))
            else:
                self.budget.spend(1)

    # --- the machine ----------------------------------------------------------------------------------

    dispatch = {op: _charged(op, run) for op, run in _Base.dispatch.items()}

    def walk(
        self, obj: Any, visit: Callable[[Any, list[Any]], None], path: list[Any] | None = None, level: int = 0
    ) -> None:
        """Call `visit(obj, path)` for `obj` and everything inside its dicts, lists and tuples, depth first;
        a shared object is visited each time it is reached (and charged each time)."""
        path = path if path is not None else []
        if level > self.depth:
            raise TooComplex(f"containers nested more than {self.depth} deep")
        self.budget.spend(1 + (len(path[-1]) >> 6 if path and isinstance(path[-1], str) else 0))
        visit(obj, path)
        if isinstance(obj, dict):
            for k, v in obj.items():
                path.append(k)
                self.walk(v, visit, path, level + 1)
                path.pop()
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                path.append(i)
                self.walk(v, visit, path, level + 1)
                path.pop()
