"""One exception hierarchy: every exception class qfl defines derives from ``qfl.errors.QflError``."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pickle
import pkgutil
from enum import Enum
from pathlib import Path

import pytest

import qfl
from qfl import errors
from qfl.errors import QflError

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("qfl", "compression", "security", "quantum", "clients", "server", "simulations", "benchmarks")


def _exception_classes_in_source(known: set[str]) -> list[tuple[str, str]]:
    """(file, class) of every class statement in the source tree, at any depth, whose base is an exception.

    A base counts if its last dotted name is a builtin exception or one of ``known``.
    """
    known = known | {n for n, v in vars(builtins).items() if inspect.isclass(v) and issubclass(v, BaseException)}
    found, seen = [], set()
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() in seen:  # qfl/server -> ../server and the like
                continue
            seen.add(path.resolve())
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef) and any(ast.unparse(b).split(".")[-1] in known for b in node.bases):
                    found.append((str(path.resolve().relative_to(ROOT)), node.name))
    return found


def _project_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(qfl.__path__, "qfl.") if m.name != "qfl.__main__"]


def test_every_project_exception_class_derives_from_qfl_error():
    defined: dict[str, type] = {}
    for name in _project_modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("qfl."):
                defined[f"{obj.__module__}.{obj.__qualname__}"] = obj
    assert "qfl.errors.KeyExhausted" in defined and "qfl.config.ConfigError" not in defined  # defined once
    outside = sorted(name for name, cls in defined.items() if not issubclass(cls, QflError))
    assert outside == []
    # every class statement deriving from an exception, also inside a function, is one of those checked
    names = {cls.__qualname__ for cls in defined.values()}
    missing = [(f, c) for f, c in _exception_classes_in_source(names) if c not in names]
    assert missing == []


def test_the_public_classes_live_in_qfl_errors_and_keep_their_builtin_bases():
    public = [getattr(errors, name) for name in errors.__all__]
    exceptions = [cls for cls in public if issubclass(cls, BaseException)]
    reasons = [cls for cls in public if issubclass(cls, Enum)]
    assert len(exceptions) + len(reasons) == len(public)
    assert all(issubclass(cls, QflError) and cls.__module__ == "qfl.errors" for cls in exceptions)
    assert all(cls.__module__ == "qfl.errors" and cls.__name__.endswith("Reason") for cls in reasons)
    assert issubclass(errors.CodecError, ValueError) and issubclass(errors.DatasetNotFound, FileNotFoundError)
    assert issubclass(errors.KmsUnavailable, ConnectionError) and issubclass(errors.ResumeError, RuntimeError)
    assert issubclass(errors.StoreOutdated, errors.StoreCorrupt) and issubclass(errors.KmsError, errors.KeyLayerError)


def test_old_import_paths_give_the_same_classes():
    from qfl.clients.datasets import DatasetNotFound
    from qfl.compression.codec import CodecError
    from qfl.config import ConfigError
    from qfl.security.keys.source import KeyExhausted
    from qfl.security.keys.store import StoreOutdated
    from qfl.security.secagg import SecAggError
    from qfl.server.untrusted import UntrustedValue

    assert (DatasetNotFound, CodecError, ConfigError, KeyExhausted, StoreOutdated, SecAggError, UntrustedValue) == (
        errors.DatasetNotFound, errors.CodecError, errors.ConfigError, errors.KeyExhausted, errors.StoreOutdated,
        errors.SecAggError, errors.UntrustedValue,
    )


@pytest.mark.parametrize("error", [
    errors.CodecError("truncated", reason=errors.CodecReason.TRUNCATED),
    errors.UnknownKeyId("spent"),
    errors.UntrustedValue("'loss' must be finite", reason=errors.UntrustedReason.NOT_FINITE, key="loss"),
    errors.NotEnoughNodes("only 1 of 2", connected=1, needed=2),
    errors.KeyExhausted("a~b", 8, 0),
    errors.ConfigError("bad", key="rounds"),
])
def test_errors_keep_their_structured_fields_through_pickle(error):
    copy = pickle.loads(pickle.dumps(error))  # Ray and multiprocessing move exceptions this way
    assert type(copy) is type(error) and copy.args == error.args and vars(copy) == vars(error)


def test_unknown_key_id_is_a_replay():
    assert errors.UnknownKeyId("spent").reason is errors.SecAggReason.REPLAYED


def test_qfl_errors_imports_nothing_from_qfl():
    tree = ast.parse((ROOT / "qfl" / "errors.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name == "qfl" or a.name.startswith("qfl.") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("qfl")


@pytest.mark.parametrize("error", [errors.ConfigError("bad key"), errors.KeyExhausted("a~b", 8, 0)])
def test_the_cli_prints_a_qfl_error_as_one_line_and_exits_2(error, monkeypatch, capsys):
    from qfl import cli

    def fail(args):
        raise error

    parser = cli.build_parser()
    args = parser.parse_args(["keys", "audit", "nowhere"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, fail))
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err == f"qfl {args.command}: {error}\n"


def test_the_cli_lets_other_exceptions_through(monkeypatch):
    from qfl import cli

    def fail(args):
        raise ZeroDivisionError

    args = cli.build_parser().parse_args(["keys", "audit", "nowhere"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, fail))
    with pytest.raises(ZeroDivisionError):
        cli.main([])


class _Fixed:
    """A stand-in parser that returns ``args`` with ``func`` replaced."""

    def __init__(self, args, func):
        self.args, self.func = args, func

    def parse_args(self, argv):
        self.args.func = self.func
        return self.args
