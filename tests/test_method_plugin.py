"""A new method with an option is ONE file: its class, its `Options` (the section `method.<name>`) and its
checks, registered together; config validation consults the registry, so a method registered at run time
(here: a module written to a temporary folder and imported) is configured like a packaged one."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
from conftest import Recorder, tiny_config

from fedlora.config import ConfigError, build_config
from fedlora.methods import METHODS
from fedlora.runtime.simulation import Simulation

TOY = '''
"""Toy: FedIT whose clients take `method.toy.x` local steps."""

from pydantic import Field

from fedlora.methods import Method, MethodContext, MethodOptions, register

SEEN = []  # the options each set-up received


class Options(MethodOptions):
    x: int = Field(1, gt=0)  # local steps per round


@register
class Toy(Method):
    name = "toy"
    options = Options
    server_factors = frozenset({"A", "B"})

    @classmethod
    def check(cls, cfg):
        if cfg.method.toy.x > 10 * cfg.train.local_steps:
            raise ValueError(f"method.toy.x: {cfg.method.toy.x} > 10 x train.local_steps")

    def setup(self, ctx: MethodContext) -> None:
        SEEN.append((ctx.options.x, self.opt.x, len(ctx.client_labels)))

    def local_steps(self) -> int:
        return self.opt.x

    def train_factors(self, t):
        return {"A", "B"}

    def upload_factors(self, t):
        return {"A", "B"}
'''


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy_method.py"
    path.write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("toy_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_method"] = module
    spec.loader.exec_module(module)  # @register: from now on configs have the section method.toy
    yield module
    METHODS.pop("toy", None)
    sys.modules.pop("toy_method", None)


def test_a_method_in_one_file_gets_its_option(toy, tmp_path):
    cfg = build_config(tiny_config(tmp_path, method={"name": "toy", "toy": {"x": 3}}, federation={"rounds": 2}))
    assert cfg.method.toy.x == 3
    assert build_config(cfg.model_dump(mode="json")) == cfg  # a stored config reads back equal
    sim = Simulation(cfg, tmp_path / "runs" / "toy")
    rec = Recorder(sim)
    sim.run()
    assert toy.SEEN == [(3, 3, 3)]  # the set-up context carries the options (and each client's labels)
    assert sorted(rec.rounds) == [1, 2]
    assert all(u.metrics["steps"] == 3 for r in rec.rounds.values() for u in r["uploads"])


def test_every_config_carries_the_registered_section_with_defaults(toy, tmp_path):
    assert build_config({}).model_dump()["method"]["toy"] == {"x": 1}
    assert build_config({"method": {"name": "fedit", "toy": {"x": 2}}}).method.toy.x == 2


def test_a_bad_option_is_one_line_naming_it(toy, tmp_path):
    for bad, field in [({"x": 0}, "method.toy.x"), ({"y": 1}, "unknown field 'method.toy.y'"),
                       ({"x": 100}, "method.toy.x")]:  # the last: the method's own cross-section check
        with pytest.raises(ConfigError, match=field) as e:
            build_config(tiny_config(tmp_path, method={"name": "toy", "toy": bad}))
        assert "\n" not in str(e.value)


def test_an_unregistered_section_is_an_unknown_field():
    with pytest.raises(ConfigError, match="unknown field 'method.toy'"):
        build_config({"method": {"toy": {"x": 3}}})
    with pytest.raises(ConfigError, match="unknown method 'toy'"):
        build_config({"method": {"name": "toy"}})
