"""The language initialisation (mdt_jax/lm.py): a GPT-2 LM trunk imported from transformers'
save_pretrained folders, checked against GPT2Model's own forward; the k-means cosine loss, its
annealing weight and LM co-training; and the launch.train wiring."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mdt_jax import checkpoint, lm as L, train  # noqa: E402
from mdt_jax.data import save_d4rl_hdf5, segment_data  # noqa: E402
from mdt_jax.interop import InteropError  # noqa: E402
from mdt_jax.models.dt import DTConfig, TaskSpec, init_params  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth import make_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, NL, NH, P, V = 16, 2, 2, 64, 50


def _gpt2_config():
    return transformers.GPT2Config(n_embd=H, n_layer=NL, n_head=NH, n_positions=P, vocab_size=V,
                                   activation_function="gelu_new")


def _perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    model = _perturb(transformers.GPT2Model(_gpt2_config()))
    model.save_pretrained(tmp / "st")
    model.save_pretrained(tmp / "bin", safe_serialization=False)
    head = transformers.GPT2LMHeadModel(_gpt2_config())
    head.transformer.load_state_dict(model.state_dict())
    head.save_pretrained(tmp / "head")  # keys carry the transformer. prefix
    return tmp, model


def _cfg(lm, **kw):
    return DTConfig(state_dim=5, act_dim=3, context_len=4, max_ep_len=100, dropout=0.0, **(lm.dt_fields() | kw))


def test_import_matches_gpt2_forward(lms):
    tmp, model = lms
    a, b, c = (L.import_lm(tmp / d) for d in ("st", "bin", "head"))
    for other in (b, c):
        jax.tree.map(np.testing.assert_array_equal, a.params, other.params)
        np.testing.assert_array_equal(a.wte, other.wte)
    assert a.wte.shape == (V, H) and a.wpe.shape == (P, H) and a.config()["n_layer"] == NL
    x = np.random.default_rng(0).normal(size=(3, 12, H)).astype(np.float32)
    mask = np.ones((3, 12), np.float32)
    mask[1, :4] = 0
    with torch.no_grad():
        model.wpe.weight.zero_()  # our DT adds no position embedding
        want = model(inputs_embeds=torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).last_hidden_state
    got = L.trunk_apply(_cfg(a), a.params, jnp.asarray(x), jnp.asarray(mask))
    rows = mask.astype(bool)  # padded rows attend to nothing real: compare the real ones
    np.testing.assert_allclose(np.asarray(got)[rows], want.numpy()[rows], atol=1e-5)


def test_init_trunk_single_and_multi(lms):
    lm = L.import_lm(lms[0] / "st")
    for cfg in (_cfg(lm), DTConfig.multi_task([TaskSpec("a", 5, 3), TaskSpec("b", 4, 2)], context_len=4,
                                              max_ep_len=100, **lm.dt_fields())):
        fresh = init_params(cfg, jax.random.key(1))
        out = L.init_trunk_from_lm(cfg, fresh, lm, timestep_from_wpe=True)
        for k in [f"block_{i}" for i in range(NL)] + ["ln_f"]:
            jax.tree.map(np.testing.assert_array_equal, out[k], lm.params[k])
        emb = np.asarray(out["embed_timestep"]["embedding"])
        np.testing.assert_array_equal(emb[:P], lm.wpe)  # first n_positions rows, then rows 2: tiled
        np.testing.assert_array_equal(emb[P:], lm.wpe[2:2 + 100 - P])
        assert set(out) == set(fresh)
        for k in set(fresh) - {"ln_f", "embed_timestep"} - {f"block_{i}" for i in range(NL)}:
            jax.tree.map(np.testing.assert_array_equal, out[k], fresh[k])  # heads and embeddings kept
        kept = L.init_trunk_from_lm(cfg, fresh, lm)
        np.testing.assert_array_equal(kept["embed_timestep"]["embedding"], fresh["embed_timestep"]["embedding"])


@pytest.mark.parametrize("field,value", [("hidden_size", 32), ("n_layer", 1), ("n_head", 4),
                                         ("activation", "relu"), ("n_inner", 40), ("layer_norm_eps", 1e-6)])
def test_size_mismatch_names_the_field(lms, field, value):
    lm = L.import_lm(lms[0] / "st")
    cfg = _cfg(lm, **{field: value})
    with pytest.raises(ValueError, match=("inner_dim" if field == "n_inner" else field)) as e:
        L.init_trunk_from_lm(cfg, {}, lm)  # the config is checked before any param is read
    assert str(value if field != "n_inner" else 40) in str(e.value)


def _copy_folder(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_bad_files_are_refused(lms, tmp_path):
    tmp, model = lms
    bad = _copy_folder(tmp / "st", tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InteropError, match="model.safetensors"):
        L.import_lm(bad)
    from safetensors.numpy import save_file
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    for name, edit, needle in [("missing", lambda d: d.pop("h.1.mlp.c_fc.weight"), "missing h.1.mlp.c_fc.weight"),
                               ("shape", lambda d: d.update({"ln_f.bias": np.zeros(3, np.float32)}), "ln_f.bias"),
                               ("nan", lambda d: d["h.0.attn.c_proj.weight"].__setitem__((0, 0), np.nan),
                                "non-finite values in h.0.attn.c_proj.weight")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes((tmp / "st" / "config.json").read_bytes())
        d = {k: v.copy() for k, v in sd.items()}
        edit(d)
        save_file(d, str(folder / "model.safetensors"))
        with pytest.raises(InteropError, match=needle):
            L.import_lm(folder)
    with pytest.raises(InteropError, match="no config.json"):
        L.import_lm(tmp_path)


class _Evil:
    target = ""

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def test_malicious_pickle_runs_nothing(lms, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_bytes((lms[0] / "st" / "config.json").read_bytes())
    marker = tmp_path / "marker.txt"
    _Evil.target = str(marker)
    torch.save({"wte.weight": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(InteropError, match="refused to unpickle"):
        L.import_lm(folder)
    assert not marker.exists()


def test_load_tokens(tmp_path):
    good = tmp_path / "t.npy"
    np.save(good, np.arange(30, dtype=np.int64) % V)
    assert L.load_tokens(good, V).dtype == np.int32
    for name, arr, needle in [("f.npy", np.zeros(10, np.float32), "float32"),
                              ("2d.npy", np.zeros((2, 5), np.int32), r"\(2, 5\)"),
                              ("big.npy", np.array([1, 2, V], np.int32), "values in")]:
        np.save(tmp_path / name, arr)
        with pytest.raises(ValueError, match=needle) as e:
            L.load_tokens(tmp_path / name, V)
        assert name in str(e.value)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        L.load_tokens(tmp_path / "obj.npy", V)


def test_kmeans_loss_formula_and_anneal():
    r = np.random.default_rng(0)
    e, c = r.normal(size=(2, 6, 8)).astype(np.float32), r.normal(size=(5, 8)).astype(np.float32)
    brute = -np.einsum("iaj,bj->iabj", e, c).max(2).mean()  # the reference's expression
    np.testing.assert_allclose(L.kmeans_cosine_loss(jnp.asarray(e), jnp.asarray(c)), brute, rtol=1e-6)
    n = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    np.testing.assert_allclose(L.kmeans_cosine_loss(jnp.asarray(e), jnp.asarray(c), normalize=True),
                               -np.einsum("iaj,bj->iabj", n(e), n(c)).max(2).mean(), rtol=1e-5)
    mask = np.zeros((2, 6), np.float32)
    mask[0, 2:] = 1
    np.testing.assert_allclose(L.kmeans_cosine_loss(jnp.asarray(e), jnp.asarray(c), jnp.asarray(mask)),
                               -np.einsum("aj,bj->abj", e[0, 2:], c).max(1).mean(), rtol=1e-6)
    ref = lambda x: 1 / (1 + np.exp(-(((15000 - x) / (15000 / 10)) - 5)))  # lm_cotraining seq_trainer.py
    for step in (0, 100, 7499, 12000, 14999, 40000):
        np.testing.assert_allclose(L.kmeans_weight(step, 0.1), 0.1 * ref(step + 1), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(L.kmeans_weight(7499, 1.0), 0.5, atol=1e-6)


def test_centroids_deterministic_and_kmeans_loss_decreases(lms):
    lm = L.import_lm(lms[0] / "st")
    c1, c2 = L.lm_centroids(lm.wte, 8, seed=3), L.lm_centroids(lm.wte, 8, seed=3)
    np.testing.assert_array_equal(c1, c2)
    assert c1.shape == (8, H) and np.all(np.isfinite(c1))
    with pytest.raises(ValueError, match="k must"):
        L.lm_centroids(lm.wte, V + 1)
    cfg = _cfg(lm)
    params = L.init_trunk_from_lm(cfg, init_params(cfg, jax.random.key(0)), lm)
    ds = segment_data(make_dataset(n_traj=4, state_dim=5, act_dim=3), context_len=4, max_ep_len=100)
    from mdt_jax.data import sample_batch
    batch = sample_batch(ds, jax.random.key(0), 8)
    loss = jax.jit(lambda p: L.kmeans_cosine_loss(L.input_embeddings(cfg, p, batch), c1))
    opt = optax.adam(1e-2)
    st = opt.init(params)
    first = float(loss(params))
    step = jax.jit(lambda p, s: (lambda g: (optax.apply_updates(p, opt.update(g, s)[0]), opt.update(g, s)[1]))(
        jax.grad(loss)(p)))
    for _ in range(30):
        params, st = step(params, st)
    assert float(loss(params)) < first - 0.05, (first, float(loss(params)))


def test_lm_loss_decreases_and_aux_hook(lms, tmp_path):
    lm = L.import_lm(lms[0] / "st")
    cfg = _cfg(lm)
    np.save(tmp_path / "corpus.npy", np.tile(np.array([3, 17, 5, 41, 8, 22, 9, 30], np.int64), 40))
    tokens = jnp.asarray(L.load_tokens(tmp_path / "corpus.npy", V))
    params = L.init_trunk_from_lm(cfg, init_params(cfg, jax.random.key(0)), lm)
    toks = L.sample_token_windows(tokens, jax.random.key(0), 4, 16)
    assert toks.shape == (4, 16)
    loss = jax.jit(lambda p: L.lm_loss(cfg, p, lm, toks))
    opt = optax.adam(3e-3)
    st, first = opt.init(params), float(loss(params))

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s)
        return optax.apply_updates(p, u), s

    for _ in range(30):
        params, st = step(params, st)
    assert float(loss(params)) < 0.7 * first, (first, float(loss(params)))

    # the train-step hook: loss = action MSE + aux, aux metrics logged
    ds = segment_data(make_dataset(n_traj=4, state_dim=5, act_dim=3), context_len=4, max_ep_len=100)
    tcfg = train.TrainConfig(batch_size=4, warmup_steps=10)
    base = train.default_sampler(cfg, tcfg)
    sample = lambda d, k: base(d[0], k) | {"lm_tokens": L.sample_token_windows(d[1], k, 2, 16)}
    aux = L.make_aux_loss(cfg, lm, centroids=L.lm_centroids(lm.wte, 4), cotrain_weight=0.5)
    state = train.init_state(cfg, tcfg, jax.random.key(0), params)
    _, m = jax.jit(train.make_train_step(cfg, tcfg, sample, aux))(state, (ds, tokens))
    assert {"lm_kmeans", "lm_kmeans_weight", "lm_loss", "aux_loss"} <= set(m)
    np.testing.assert_allclose(m["aux_loss"], m["lm_kmeans_weight"] * m["lm_kmeans"] + 0.5 * m["lm_loss"], rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["action_mse"] + m["aux_loss"], rtol=1e-5)


def _train_config(tmp, lm_dir, **over):
    """configs/train.py with the overrides launch.train would get from `--config.x=y` flags."""
    from configs.train import get_config

    c = get_config()
    c.task, c.dataset, c.num_steps, c.steps_per_call = "hopper", str(tmp / "hopper.hdf5"), 3, 3
    c.train.batch_size, c.model.context_len, c.model.hidden_size, c.model.n_layer = 4, 4, H, NL
    c.model.n_head, c.model.activation, c.init_from_lm, c.lm_kmeans = NH, "gelu_new", str(lm_dir), 8
    for k, v in over.items():
        c[k] = v
    return c


def test_train_from_lm(lms, tmp_path):
    """launch.train's entry (run.train_from_config) with an LM init, k-means and co-training; the
    CLI's exit codes for bad configs are checked in tests/test_train.py."""
    from mdt_jax.run import train_from_config

    save_d4rl_hdf5(make_dataset(n_traj=4), tmp_path / "hopper.hdf5")
    np.save(tmp_path / "corpus.npy", np.arange(200, dtype=np.int32) % V)
    train_from_config(_train_config(tmp_path, lms[0] / "st", lm_tokens=str(tmp_path / "corpus.npy"), lm_seq_len=16),
                      str(tmp_path / "run"))
    cfg, params, meta = checkpoint.load(tmp_path / "run" / "model")
    assert cfg.hidden_size == H and meta["init_from_lm"]["folder"] == str(lms[0] / "st")
    assert meta["init_from_lm"]["config"]["n_embd"] == H and meta["init_from_lm"]["kmeans"] == 8
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"lm_kmeans", "lm_loss", "aux_loss"} <= set(logged[-1])
    # a bad LM folder: a clear error naming the field (launch.train exits 2 on it), nothing written
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text('{"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2}')
    (junk / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="config.init_from_lm"):
        train_from_config(_train_config(tmp_path, junk), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("overrides,needle", [
    (dict(hidden_size=32), "hidden_size: DT 32 vs LM 16"),
    (dict(lm_kmeans=8, init_from_lm=""), "config.lm_kmeans"),
    (dict(lm_tokens="x.npy", init_from_lm=""), "config.lm_tokens"),
    (dict(init_from="/some/model"), "config.init_from_lm"),
    (dict(lm_kmeans=V + 1), "config.lm_kmeans"),
    (dict(lm_kmeans_const=-1.0), "config.lm_kmeans_const"),
    (dict(lm_tokens="FLOAT", lm_seq_len=8), "config.lm_tokens"),
    (dict(lm_tokens="INTS", lm_seq_len=P + 1, lm_timestep_from_wpe=False), "config.lm_seq_len"),
])
def test_train_config_errors_write_nothing(lms, tmp_path, overrides, needle):
    from configs.train import get_config
    from mdt_jax.run import train_from_config

    save_d4rl_hdf5(make_dataset(n_traj=4), tmp_path / "hopper.hdf5")
    np.save(tmp_path / "FLOAT.npy", np.zeros(100, np.float32))
    np.save(tmp_path / "INTS.npy", np.zeros(100, np.int32))
    c = get_config()
    c.dataset, c.num_steps, c.init_from_lm = str(tmp_path / "hopper.hdf5"), 2, str(lms[0] / "st")
    c.model.hidden_size, c.model.n_layer, c.model.n_head, c.model.activation = H, NL, NH, "gelu_new"
    for k, v in overrides.items():
        if k == "lm_tokens" and v in ("FLOAT", "INTS"):
            v = str(tmp_path / f"{v}.npy")
        if k in c.model:
            c.model[k] = v
        else:
            c[k] = v
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        train_from_config(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
