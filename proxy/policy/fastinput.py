"""Hand the input document to rego-cpp without regopy's generic converter.

``regopy.Input(doc)`` walks the document in Python and, for every node, runs a chain of
``isinstance`` checks against ``collections.abc`` classes, copies each string into a fresh
``ctypes`` buffer and goes through a checking wrapper per C call. For Keyless's input (about 50
nodes) that cost more than evaluating the default policy itself (profiled: ~90 us of a ~200 us
decision). This module makes the same C calls (``regoInput*``, built bottom-up on rego-cpp's
input stack) with a dispatch on the exact type, ``bytes`` passed straight to ``c_char_p`` and
one return-code check per call.

The result is the same rego-cpp value regopy would build: the type order (bool before int,
str before sequences) mirrors ``rego_shared.rego_input_from_value``, and anything that is not a
plain dict/list/tuple/str/int/float/bool/None falls back to the same ``collections.abc`` checks.
tests/test_fastinput.py compares the two on the policy's own view of ``input``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any

from regopy import rego_shared as _rs

_lib = _rs.rego
_new = _lib.regoNewInput
_free = _lib.regoFreeInput
_set = _lib.regoSetInput
_int = _lib.regoInputInt
_float = _lib.regoInputFloat
_str = _lib.regoInputString
_bool = _lib.regoInputBoolean
_null = _lib.regoInputNull
_item = _lib.regoInputObjectItem
_object = _lib.regoInputObject
_array = _lib.regoInputArray
_set_of = _lib.regoInputSet


class InputError(ValueError):
    """The document could not be converted; carries rego-cpp's return code, never the value."""


def _add(p: int, v: Any) -> None:
    t = type(v)
    if t is str:
        code = _str(p, v.encode())
    elif t is dict:
        for k, x in v.items():
            _add(p, k)
            _add(p, x)
            if _item(p):
                raise InputError("object item")
        code = _object(p, len(v))
    elif t is list or t is tuple:
        for x in v:
            _add(p, x)
        code = _array(p, len(v))
    elif t is bool:
        code = _bool(p, v)
    elif t is int:
        code = _int(p, v)
    elif v is None:
        code = _null(p)
    elif t is float:
        code = _float(p, v)
    else:
        _add_generic(p, v)
        return
    if code:
        raise InputError(f"cannot add a {t.__name__} (code {code})")


def _add_generic(p: int, v: Any) -> None:
    # Subclasses and abstract containers: the same order of checks as regopy.
    if v is True or v is False:
        code = _bool(p, v)
    elif isinstance(v, int):
        code = _int(p, int(v))
    elif isinstance(v, float):
        code = _float(p, float(v))
    elif isinstance(v, str):
        code = _str(p, str(v).encode())
    elif isinstance(v, Set):
        for x in v:
            _add(p, x)
        code = _set_of(p, len(v))
    elif isinstance(v, Mapping):
        for k, x in v.items():
            _add(p, k)
            _add(p, x)
            if _item(p):
                raise InputError("object item")
        code = _object(p, len(v))
    elif isinstance(v, Sequence):
        for x in v:
            _add(p, x)
        code = _array(p, len(v))
    else:
        raise InputError(f"cannot convert a {type(v).__name__} to rego input")
    if code:
        raise InputError(f"cannot add a {type(v).__name__} (code {code})")


def set_input(interp_impl: Any, value: Any) -> None:
    """Build ``value`` as a rego-cpp input and make it the interpreter's ``input``.

    rego-cpp copies the input on ``regoSetInput``, so the built value is freed right after.
    """
    p = _new()
    if not p:
        raise InputError("cannot allocate input")
    try:
        _add(p, value)
        code = _set(interp_impl, p)
        if code:
            raise InputError(f"cannot set input: {_rs.rego_get_error(interp_impl)}")
    finally:
        _free(p)
