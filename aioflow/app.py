"""`App`: the registry of orchestrators and activities a worker can run."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from aioflow.entities import RegisteredEntity, register_entity
from aioflow.errors import ConfigurationError, UnknownFunctionError
from aioflow.serialization import param_annotation, return_annotation

F = TypeVar("F", bound=Callable[..., Any])

_NAME_ATTR = "__aioflow_name__"


@dataclass(frozen=True, slots=True)
class Registered:
    """A registered function with the annotations used to rebuild its typed payloads."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    input_type: Any
    output_type: Any
    #: Whether the function accepts the input argument (an orchestrator's second positional
    #: parameter, an activity's first); decided once here rather than on every call.
    takes_input: bool = True


def function_name(fn_or_name: Any) -> str:
    """The registered name of a decorated function, or the string itself."""
    if isinstance(fn_or_name, str):
        if not fn_or_name:
            raise ValueError("a function name must not be empty")
        return fn_or_name
    name = getattr(fn_or_name, _NAME_ATTR, None)
    if name is None:
        name = getattr(fn_or_name, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(
            f"expected an orchestrator/activity function or its registered name, got "
            f"{fn_or_name!r}"
        )
    return name


class App:
    """A registry of orchestrators, activities and entities.

    ```python
    app = aioflow.App()

    @app.activity
    async def say_hello(name: str) -> str: ...

    @app.orchestrator
    async def hello(ctx: aioflow.OrchestrationContext, names: list[str]) -> list[str]: ...
    ```

    Decorators return the function unchanged (tagged with its registered name), so it can be
    passed to `ctx.call_activity` and `client.start_new` by reference.
    """

    def __init__(self) -> None:
        self.orchestrators: dict[str, Registered] = {}
        self.activities: dict[str, Registered] = {}
        self.entities: dict[str, RegisteredEntity] = {}

    # -- registration ----------------------------------------------------------------------
    @overload
    def orchestrator(self, fn: F) -> F: ...
    @overload
    def orchestrator(self, *, name: str | None = None) -> Callable[[F], F]: ...

    def orchestrator(self, fn: Any = None, *, name: str | None = None) -> Any:
        """Register an `async def f(ctx, input)` orchestrator (optionally under `name`)."""
        def register(f: F) -> F:
            if not inspect.iscoroutinefunction(f):
                raise ConfigurationError(
                    f"orchestrator {getattr(f, '__qualname__', f)!r} must be an `async def` "
                    f"function taking (ctx, input); it is {type(f).__name__}"
                )
            self._add(self.orchestrators, "orchestrator", name, f, input_index=1)
            return f
        return register(fn) if fn is not None else register

    @overload
    def activity(self, fn: F) -> F: ...
    @overload
    def activity(self, *, name: str | None = None) -> Callable[[F], F]: ...

    def activity(self, fn: Any = None, *, name: str | None = None) -> Any:
        """Register an activity: `async def f(input)` or plain `def f(input)` (runs in a thread)."""
        def register(f: F) -> F:
            if not callable(f):
                raise ConfigurationError(f"activity {f!r} is not callable")
            self._add(self.activities, "activity", name, f, input_index=0)
            return f
        return register(fn) if fn is not None else register

    @overload
    def entity(self, fn: F) -> F: ...
    @overload
    def entity(self, *, name: str | None = None) -> Callable[[F], F]: ...

    def entity(self, fn: Any = None, *, name: str | None = None) -> Any:
        """Register a durable entity: a function `f(ctx: EntityContext)` (sync or async), or a
        class whose public methods are its operations (see `aioflow.entities`). Entity names are
        case-insensitive; the default is the function's or class's name."""
        def register(f: F) -> F:
            reg = register_entity(name or f.__name__, f)
            existing = self.entities.get(reg.name)
            if existing is not None and existing.target is not f:
                raise ConfigurationError(
                    f"an entity named {reg.name!r} is already registered; pass name=... to "
                    f"register this one under another name")
            self.entities[reg.name] = reg
            return f
        return register(fn) if fn is not None else register

    def _add(self, table: dict[str, Registered], kind: str, name: str | None, fn: Any,
             *, input_index: int) -> None:
        reg_name = name or fn.__name__
        if reg_name in table and table[reg_name].fn is not fn:
            raise ConfigurationError(
                f"an {kind} named {reg_name!r} is already registered; pass name=... to register "
                f"this one under another name"
            )
        table[reg_name] = Registered(
            name=reg_name,
            fn=fn,
            is_async=inspect.iscoroutinefunction(fn),
            input_type=param_annotation(fn, input_index),
            output_type=return_annotation(fn),
            takes_input=_accepts_positional(fn, input_index + 1),
        )
        try:
            setattr(fn, _NAME_ATTR, reg_name)
        except (AttributeError, TypeError):
            pass

    # -- lookup ----------------------------------------------------------------------------
    def get_orchestrator(self, name: str) -> Registered:
        try:
            return self.orchestrators[name]
        except KeyError:
            raise UnknownFunctionError(_unknown("orchestrator", name, self.orchestrators)) from None

    def get_activity(self, name: str) -> Registered:
        try:
            return self.activities[name]
        except KeyError:
            raise UnknownFunctionError(_unknown("activity", name, self.activities)) from None


    def get_entity(self, name: str) -> RegisteredEntity:
        try:
            return self.entities[name.lower()]
        except KeyError:
            known = ", ".join(sorted(self.entities)) or "none"
            raise UnknownFunctionError(
                f"no entity named {name!r} is registered (registered entities: {known}); "
                f"register it with @app.entity on the App the worker runs") from None


def _accepts_positional(fn: Callable[..., Any], count: int) -> bool:
    """Whether `fn` can be called with `count` positional arguments (True if unknowable)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= count or any(p.kind is p.VAR_POSITIONAL for p in params)


def _unknown(kind: str, name: str, table: dict[str, Registered]) -> str:
    known = ", ".join(sorted(table)) or "none"
    return (f"no {kind} named {name!r} is registered (registered {kind}s: {known}); register it "
            f"with @app.{kind} on the App the worker runs")
