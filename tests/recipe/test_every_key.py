"""Every recipe key reaches what it names: a tiny run reads each one (or, for a key that only one
kind of target uses, resolving that target does)."""

import json

from icnn_compress.recipe import Runner, _schema, load_recipe

from .test_cli import TINY


def _leaves(cls, out=None):
    out = set() if out is None else out
    for name, info in cls.model_fields.items():
        out.add((cls.__name__, name))
        if isinstance(info.annotation, type) and issubclass(info.annotation, _schema._Strict):
            _leaves(info.annotation, out)
    return out


def test_a_run_reads_every_key_of_the_schema(tmp_path, monkeypatch):
    read = set()
    original = _schema._Strict.__getattribute__

    def spy(self, name):
        cls = type(self)
        if name in cls.model_fields:
            read.add((cls.__name__, name))
        return original(self, name)

    monkeypatch.setattr(_schema._Strict, "__getattribute__", spy)
    Runner(load_recipe(json.loads(json.dumps(TINY))), tmp_path / "run", progress=False).run()
    # the batch of a latency target is read where that target is resolved
    data = json.loads(json.dumps(TINY))
    data["prune"].update(macs_reduction=None, latency_speedup=1.2, latency_batch=4)
    assert load_recipe(data).prune.target == {"latency_speedup": 1.2, "latency_batch": 4}
    unread = sorted(_leaves(_schema.Recipe) - read)
    assert not unread, f"recipe keys that nothing reads: {unread}"
