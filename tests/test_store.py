"""fileio.Store: the one keyed, atomic store behind every stage's resume and cache (cached stages,
Fisher chunk sums, collection waves, the CMA-ES state, the SAC trainer's state).

Each entry appears complete under its name or not at all: a writer killed with SIGKILL at any
point leaves only entries that read back whole, and a rerun recomputes exactly the missing ones.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mdt_jax import fileio
from mdt_jax.fileio import JSON, NPZ, Store, tree_codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same(a[k], b[k])
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype


def test_each_codec_round_trips_and_names_its_entry(tmp_path):
    js = Store(tmp_path, JSON)
    js.put("rows", [{"a": 1.5, "b": None}])
    assert js.get("rows") == [{"a": 1.5, "b": None}] and (tmp_path / "rows.json").is_file()

    npz = Store(tmp_path, NPZ)
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.asarray(3)}
    npz.put("wave_000001", arrays)
    _same(npz.get("wave_000001"), arrays)
    assert (tmp_path / "wave_000001.npz").is_file()

    tree = Store(tmp_path, tree_codec("sums"))
    value = {"sums": {"0": np.ones((2, 2), np.float32)}, "n": np.asarray(7, np.int64)}
    tree.put("chunk_0", value)
    _same(tree.get("chunk_0"), value)
    assert (tmp_path / "chunk_0" / "sums").is_dir()

    headed = Store(tmp_path, tree_codec("arrays", header="host.json"))
    headed.put("state", ({"w": np.zeros(3)}, {"env_steps": 5}))
    got, host = headed.get("state")
    _same(got, {"w": np.zeros(3)})
    assert host == {"env_steps": 5}
    assert sorted(os.listdir(tmp_path / "state")) == ["arrays", "host.json"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "no temporary left behind"


def test_missing_is_none_and_replacing_needs_overwrite(tmp_path):
    for codec, a, b in [(JSON, {"v": 1}, {"v": 2}), (NPZ, {"v": np.ones(2)}, {"v": np.zeros(2)}),
                        (tree_codec(), {"v": np.ones(2)}, {"v": np.zeros(2)})]:
        s = Store(tmp_path / codec.suffix.strip(".") or "tree", codec)
        assert s.get("k") is None and "k" not in s
        s.put("k", a)
        with pytest.raises(FileExistsError):
            s.put("k", b)
        _same(s.get("k"), a)
        s.put("k", b, overwrite=True)
        _same(s.get("k"), b)


def test_cached_computes_once_even_for_a_null_value(tmp_path):
    calls = []
    s = Store(tmp_path, JSON)
    for _ in range(3):
        assert s.cached("nothing", lambda: calls.append(1)) is None
    assert calls == [1]
    assert fileio.cached_json(str(tmp_path / "x.json"), lambda: {"a": [1, 2]}) == {"a": [1, 2]}
    assert fileio.cached_json(str(tmp_path / "x.json"), lambda: pytest.fail("recomputed")) == {"a": [1, 2]}
    with pytest.raises(ValueError, match="must end in .json"):
        fileio.cached_json(str(tmp_path / "x.txt"), dict)


@pytest.mark.parametrize("key", ["", "a/b", ".hidden", "../up"])
def test_keys_are_plain_names(tmp_path, key):
    with pytest.raises(ValueError, match="plain name"):
        Store(tmp_path, JSON).put(key, 1)


def test_a_failed_write_leaves_no_entry_and_no_temporary(tmp_path):
    class Boom(Exception):
        pass

    def bad(path, value):
        with open(path, "w") as f:
            f.write("half")
        raise Boom
    s = Store(tmp_path, fileio.Codec(".json", bad, JSON.read))
    with pytest.raises(Boom):
        s.put("k", 1)
    folder = Store(tmp_path, fileio.Codec("", lambda v: {"a": lambda p: open(p, "w").close(),
                                                         "b": lambda p: (_ for _ in ()).throw(Boom())}, None))
    with pytest.raises(Boom):
        folder.put("d", None)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("codec,name", [(JSON, "k.json"), (NPZ, "k.npz"), (tree_codec("sums"), "k")])
def test_a_damaged_entry_raises_the_stores_error_naming_its_path(tmp_path, codec, name):
    class StageError(ValueError):
        pass
    s = Store(tmp_path, codec, error=StageError, what="test entry")
    s.put("k", {"v": np.ones(4)} if codec is not JSON else {"v": 1})
    target = tmp_path / name
    if target.is_dir():
        for root, _, files in os.walk(target):
            for f in files:
                if f not in ("_CHECKPOINT_METADATA",):
                    open(os.path.join(root, f), "wb").close()
    else:
        target.write_bytes(b"\x00garbage")
    with pytest.raises(StageError, match=str(tmp_path)):
        s.get("k")


_arrays = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
    hnp.arrays(st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.bool_, np.uint8]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=_arrays)
def test_npz_entries_round_trip_any_arrays(tmp_path, arrays):
    s = Store(tmp_path, NPZ)
    s.put("k", arrays, overwrite=True)
    _same(s.get("k"), arrays)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
                          | st.floats(allow_nan=False, allow_infinity=False),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=10))
def test_json_entries_round_trip_any_json(tmp_path, value):
    s = Store(tmp_path, JSON)
    s.put("k", value, overwrite=True)
    assert s.get("k") == json.loads(json.dumps(value))


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from mdt_jax.fileio import NPZ, Store, tree_codec
    kind, folder = sys.argv[1], sys.argv[2]
    s = Store(folder, NPZ if kind == "npz" else tree_codec("sums"))
    for i in range(10_000):
        k = f"e{i:05d}"
        if k not in s:
            s.put(k, {"x": np.full((256, 256), i, np.float64)})
""")


@pytest.mark.parametrize("kind", ["npz", "tree"])
def test_sigkilled_writers_leave_only_whole_entries(tmp_path, kind):
    """A writer SIGKILLed three times at random points, and rerun: every entry on disk reads back
    whole (its value is its index), and the rerun continues where the last one stopped."""
    rng = np.random.default_rng(0)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    done = lambda: len([f for f in os.listdir(tmp_path) if not f.startswith(".")])
    for _ in range(3):
        before = done()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, kind, str(tmp_path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()
        while time.time() - start < 120 and proc.poll() is None and done() <= before:
            time.sleep(0.01)  # wait for this run's first entry, then kill at a random moment
        time.sleep(float(rng.uniform(0.0, 0.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    s = Store(tmp_path, NPZ if kind == "npz" else tree_codec("sums"))
    entries = sorted(f for f in os.listdir(tmp_path) if not f.startswith("."))
    assert len(entries) >= 3
    keys = [e[:-len(NPZ.suffix)] if kind == "npz" else e for e in entries]
    assert keys == [f"e{i:05d}" for i in range(len(keys))], "entries are written in order, none lost"
    for i, k in enumerate(keys):
        np.testing.assert_array_equal(s.get(k)["x"], np.full((256, 256), i, np.float64))
