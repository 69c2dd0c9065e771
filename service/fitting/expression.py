"""Model expressions from untrusted text: parsed with an allow-list, never evaluated by Python.

``parse("b1*(1-exp(-b2*x))", variables=("x",), parameters=("b1", "b2"))`` walks Python's
syntax tree (:mod:`ast`, which only parses) and accepts nothing but numbers, the listed
variables and parameters, the constants ``pi`` and ``e``, the operators ``+ - * / **``
(unary minus and plus too), parentheses, and calls of ``exp log sqrt sin cos tan atan tanh
abs`` with one argument. Everything else (attributes, subscripts, other calls, keywords,
lambdas, comprehensions, conditionals, comparisons, f-strings, statements) is refused with
an :class:`ExpressionError` naming the problem. Nothing is folded or computed at parse
time, so ``9**9**9`` costs nothing here (it overflows to inf when fitted, and the fit
answers a divergence).

The result is a small tree of frozen nodes that :func:`evaluate` walks with a namespace of
operations: TensorFlow's (the compiled fit) or numpy's (extended-precision residuals). Its
``canonical`` form names parameters and variables by position, so the same model written
with other names or spacing shares one compiled fit.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: The limits of an expression (untrusted input).
MAX_LENGTH = 2000
MAX_DEPTH = 64
MAX_PARAMETERS = 32
FUNCTIONS = ("exp", "log", "sqrt", "sin", "cos", "tan", "atan", "tanh", "abs")
#: Constants, as decimal text (so that extended precision gets every digit).
CONSTANTS = {
    "pi": "3.14159265358979323846264338327950288",
    "e": "2.71828182845904523536028747135266250",
}
_BINARY: dict[type[ast.operator], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Pow: "**",
}
_UNARY: dict[type[ast.unaryop], str] = {ast.USub: "-", ast.UAdd: "+"}
#: How refused operators are named in messages (as written, not as Python calls them).
_OPERATORS: dict[type[ast.AST], str] = {
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Invert: "~",
    ast.Not: "not",
}


MIB = 1024 * 1024


class ExpressionError(ValueError):
    """An expression that is not allowed: ``kind`` is a short code, the message says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Number:
    text: str

    @property
    def value(self) -> float:
        return float(self.text)


@dataclass(frozen=True, slots=True)
class Parameter:
    index: int


@dataclass(frozen=True, slots=True)
class Variable:
    index: int


@dataclass(frozen=True, slots=True)
class Constant:
    name: str


@dataclass(frozen=True, slots=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Call:
    function: str
    argument: Node


Node = Number | Parameter | Variable | Constant | Unary | Binary | Call


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed model: its tree, and the names its positions stand for."""

    text: str
    tree: Node
    parameters: tuple[str, ...]
    variables: tuple[str, ...]

    @property
    def complexity(self) -> int:
        """Parameters x nodes: what compiling this model's fit costs grows with it. The
        compiled loop holds one derivative of the tree per parameter (the Jacobian's columns,
        the Hessian's rows), so its graph has about this many operations times a constant;
        compile time and memory follow (docs/expressions.md has the measurements)."""
        return len(self.parameters) * _count(self.tree)

    @property
    def canonical(self) -> str:
        """The tree with parameters as p0, p1, ... and variables as x0, x1, ... in order,
        fully parenthesized: equal for expressions that compute the same thing the same way."""
        return _show(self.tree)


def parse(text: str, variables: Sequence[str], parameters: Iterable[str]) -> Expression:
    """The expression ``text`` (y as a function of ``variables`` and ``parameters``), checked
    against the allow-list; raises :class:`ExpressionError`."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(
            "too_long", f"the expression has {len(text)} characters; at most {MAX_LENGTH}"
        )
    names = list(parameters)
    if not names:
        raise ExpressionError(
            "no_parameters",
            "a model needs at least one parameter: list each in parameters with a starting value",
        )
    if len(names) > MAX_PARAMETERS:
        raise ExpressionError(
            "too_many_parameters", f"{len(names)} parameters; at most {MAX_PARAMETERS}"
        )
    reserved = sorted(set(names) & (set(variables) | set(FUNCTIONS) | set(CONSTANTS)))
    if reserved:
        raise ExpressionError(
            "reserved_name",
            f"{', '.join(reserved)} cannot be a parameter: it names a variable, a function "
            "or a constant",
        )
    try:
        body = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ExpressionError("syntax", f"not a valid expression: {error.msg}") from None
    except (RecursionError, MemoryError):
        raise ExpressionError("too_deep", f"nesting deeper than {MAX_DEPTH}") from None
    builder = _Builder({n: i for i, n in enumerate(names)}, {v: i for i, v in enumerate(variables)})
    tree = builder.build(body, 1)
    unused = [n for n in names if n not in builder.used]
    if unused:
        raise ExpressionError(
            "unused_parameter",
            f"parameter {', '.join(unused)} does not appear in the expression",
        )
    return Expression(text, tree, tuple(names), tuple(variables))


class _Builder:
    def __init__(self, parameters: Mapping[str, int], variables: Mapping[str, int]) -> None:
        self.parameters = parameters
        self.variables = variables
        self.used: set[str] = set()

    def build(self, node: ast.AST, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise ExpressionError("too_deep", f"nesting deeper than {MAX_DEPTH}")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ExpressionError("not_allowed", f"the constant {value!r} is not a number")
            try:
                finite = math.isfinite(float(value))
            except OverflowError:
                finite = False
            if not finite:
                raise ExpressionError(
                    "not_allowed", f"the number {str(value)[:20]} overflows float64"
                )
            return Number(repr(value) if isinstance(value, float) else str(value))
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return Unary(_UNARY[type(node.op)], self.build(node.operand, depth + 1))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left = self.build(node.left, depth + 1)
            return Binary(_BINARY[type(node.op)], left, self.build(node.right, depth + 1))
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise ExpressionError("not_allowed", f"{_describe(node)} is not allowed")

    def _name(self, name: str) -> Node:
        if name in self.parameters:
            self.used.add(name)
            return Parameter(self.parameters[name])
        if name in self.variables:
            return Variable(self.variables[name])
        if name in CONSTANTS:
            return Constant(name)
        if name in FUNCTIONS:
            raise ExpressionError("not_allowed", f"the function {name} must be called")
        raise ExpressionError(
            "unknown_name",
            f"unknown name {name!r}: add {name} to parameters (with a starting value), or "
            f"give it as a variable in x (the variables are {', '.join(self.variables)})",
        )

    def _call(self, node: ast.Call, depth: int) -> Node:
        function = node.func
        if not isinstance(function, ast.Name) or function.id not in FUNCTIONS:
            what = function.id if isinstance(function, ast.Name) else _describe(function)
            raise ExpressionError(
                "not_allowed",
                f"calling {what} is not allowed; the functions are {', '.join(FUNCTIONS)}",
            )
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise ExpressionError("not_allowed", f"{function.id} takes exactly one argument")
        return Call(function.id, self.build(node.args[0], depth + 1))


def _describe(node: ast.AST) -> str:
    kinds = {
        ast.Attribute: "attribute access",
        ast.Subscript: "a subscript",
        ast.Lambda: "a lambda",
        ast.IfExp: "a conditional",
        ast.Compare: "a comparison",
        ast.BoolOp: "a boolean operator",
        ast.JoinedStr: "an f-string",
        ast.ListComp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension",
        ast.GeneratorExp: "a comprehension",
        ast.NamedExpr: "an assignment",
        ast.Await: "await",
        ast.Yield: "yield",
        ast.Starred: "unpacking",
    }
    for kind, words in kinds.items():
        if isinstance(node, kind):
            return words
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        return "^ (use ** for powers)"
    if isinstance(node, ast.BinOp):
        return f"the operator {_OPERATORS.get(type(node.op), type(node.op).__name__)}"
    if isinstance(node, ast.UnaryOp):
        return f"the operator {_OPERATORS.get(type(node.op), type(node.op).__name__)}"
    return f"a {type(node).__name__}"


def _count(node: Node) -> int:
    """The nodes of a tree."""
    if isinstance(node, Unary):
        return 1 + _count(node.operand)
    if isinstance(node, Binary):
        return 1 + _count(node.left) + _count(node.right)
    if isinstance(node, Call):
        return 1 + _count(node.argument)
    return 1


def _show(node: Node) -> str:
    if isinstance(node, Number):
        return node.text
    if isinstance(node, Parameter):
        return f"p{node.index}"
    if isinstance(node, Variable):
        return f"x{node.index}"
    if isinstance(node, Constant):
        return node.name
    if isinstance(node, Unary):
        return f"({node.op}{_show(node.operand)})"
    if isinstance(node, Binary):
        return f"({_show(node.left)}{node.op}{_show(node.right)})"
    return f"{node.function}({_show(node.argument)})"


@dataclass(frozen=True, slots=True)
class Operations:
    """What :func:`evaluate` computes with: a number from its decimal text, and the
    functions by name (``pow`` for ``**``)."""

    number: Callable[[str], Any]
    functions: Mapping[str, Callable[[Any], Any]]
    pow: Callable[[Any, Any], Any]


def evaluate(node: Node, params: Sequence[Any], variables: Sequence[Any], ops: Operations) -> Any:
    """The value of ``node`` with these parameter and variable values."""
    if isinstance(node, Number):
        return ops.number(node.text)
    if isinstance(node, Parameter):
        return params[node.index]
    if isinstance(node, Variable):
        return variables[node.index]
    if isinstance(node, Constant):
        return ops.number(CONSTANTS[node.name])
    if isinstance(node, Unary):
        value = evaluate(node.operand, params, variables, ops)
        return -value if node.op == "-" else value
    if isinstance(node, Binary):
        left = evaluate(node.left, params, variables, ops)
        right = evaluate(node.right, params, variables, ops)
        if node.op == "+":
            return left + right
        if node.op == "-":
            return left - right
        if node.op == "*":
            return left * right
        if node.op == "/":
            return left / right
        return ops.pow(left, right)
    return ops.functions[node.function](evaluate(node.argument, params, variables, ops))


#: What compiled expressions may keep, at most (estimated by :class:`CompileCost`; the
#: default of ``TAPEFIT_EXPRESSION_CACHE_BYTES``).
CACHE_BYTES = 128 * MIB


class CompileCost:
    """What compiling an expression's loops costs, from its :attr:`Expression.complexity`
    (parameters x nodes). Measured here (AMD EPYC, 2 cores; docs/expressions.md, "Compile
    cost") on 12 models from 18 to 2,280 units, the first fit of each (Levenberg-Marquardt
    with the stopping rules) in a fresh process:

    - time ~0.5 s + 9.3 ms a unit (ENSO, 603 units: ~6 s; 2,280 units: 26 s);
    - peak memory above the warm process ~34 MiB + 0.53 MiB a unit, at most 1.12 MiB a
      unit (Gauss1's 280 units: 313 MiB);
    - kept once compiled: ~0.41 MiB a unit with XLA, which never gives it back (dropping
      the loops returned 8% of it, with malloc_trim), and ~0.21 MiB a unit as a plain graph,
      all given back when dropped;
    - and kept after running on a large bucket: a 4-parameter model on 1e6 points (bucket
      2^20) kept 153 MiB with XLA (65 MiB once dropped) and 285 MiB as a plain graph (34 MiB
      once dropped): ~150 and ~280 bytes a padded point.

    The estimates below are the upper side of those measurements.
    """

    BASE_BYTES = 64 * MIB
    BYTES_PER_UNIT = 0.7 * MIB
    XLA_KEPT_PER_UNIT = 0.45 * MIB
    GRAPH_KEPT_PER_UNIT = 0.25 * MIB
    XLA_KEPT_PER_POINT = 160.0
    GRAPH_KEPT_PER_POINT = 300.0
    BASE_SECONDS = 1.0
    SECONDS_PER_UNIT = 0.012

    @classmethod
    def peak_bytes(cls, expression: Expression) -> float:
        """Memory the compile needs while it runs."""
        return cls.BASE_BYTES + cls.BYTES_PER_UNIT * expression.complexity

    @classmethod
    def seconds(cls, expression: Expression) -> float:
        return cls.BASE_SECONDS + cls.SECONDS_PER_UNIT * expression.complexity

    @classmethod
    def kept_bytes(cls, expression: Expression, size: int, xla: bool) -> float:
        """Memory the compiled loops for a bucket of ``size`` points keep."""
        if xla:
            return cls.XLA_KEPT_PER_UNIT * expression.complexity + cls.XLA_KEPT_PER_POINT * size
        return cls.GRAPH_KEPT_PER_UNIT * expression.complexity + cls.GRAPH_KEPT_PER_POINT * size


__all__ = [
    "CACHE_BYTES",
    "CompileCost",
    "Expression",
    "ExpressionError",
    "Operations",
    "evaluate",
    "parse",
]
