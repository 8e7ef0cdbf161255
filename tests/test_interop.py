"""Interop with PyTorch DTs: transformers' DecisionTransformerModel and the reference's state dicts.

Every comparison is against a real torch forward (transformers' model, or the reference's DT
written here in torch around transformers' GPT2Model), never against our own code.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from mdt_jax import checkpoint, interop  # noqa: E402
from mdt_jax.models import dt  # noqa: E402

S, A, H, L, NH, T, K = 5, 3, 32, 2, 2, 50, 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perturb(model, seed):
    """Give every parameter (LN scales, biases, wpe[0] included) non-trivial values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs(state_dim=S, act_dim=A, padded=True, seed=0):
    rng = np.random.default_rng(seed)
    B = 3
    mask = np.ones((B, K), np.float32)
    if padded:
        mask[1, :2] = 0
        mask[2, :K - 1] = 0
    return (rng.normal(size=(B, K, state_dim)).astype(np.float32),
            rng.uniform(-1, 1, (B, K, act_dim)).astype(np.float32),
            rng.normal(size=(B, K, 1)).astype(np.float32), rng.integers(0, T, (B, K)), mask)


def _assert_close(ours, theirs, mask):
    """Compare (B, K, D) predictions at unmasked steps (ours may be padded wider, as multi-task outputs are)."""
    on = mask.astype(bool)
    theirs = theirs.detach().numpy()
    np.testing.assert_allclose(np.asarray(ours)[..., :theirs.shape[-1]][on], theirs[on], atol=1e-5, rtol=0)


def _hf(activation="relu", seed=0):
    cfg = transformers.DecisionTransformerConfig(state_dim=S, act_dim=A, hidden_size=H, n_layer=L, n_head=NH,
                                                 max_ep_len=T, activation_function=activation)
    model = _perturb(transformers.DecisionTransformerModel(cfg), seed)
    with torch.no_grad():
        model.encoder.wpe.weight[0] = torch.randn(H)  # the constant HF adds after embed_ln
    return model


def _hf_forward(model, s, a, r, t, mask):
    with torch.no_grad():
        return model(states=torch.tensor(s), actions=torch.tensor(a), returns_to_go=torch.tensor(r),
                     timesteps=torch.tensor(t), attention_mask=torch.tensor(mask), return_dict=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = _hf()
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.parametrize("activation", ["relu", "gelu_new"])
def test_import_hf_matches_transformers(tmp_path, activation):
    model = _hf(activation, seed=1)
    model.save_pretrained(tmp_path)
    cfg, params = interop.import_hf(tmp_path, context_len=K)
    assert (cfg.activation, cfg.timestep_embedding, cfg.n_head, cfg.context_len) == (activation, "before_ln", NH, K)
    for padded in (False, True):
        s, a, r, t, mask = _inputs(padded=padded)
        theirs = _hf_forward(model, s, a, r, t, mask)
        for ours, their in zip(dt.apply(cfg, params, s, a, r, t, mask, outputs="all"), theirs):
            _assert_close(ours, their, mask)
        _assert_close(dt.apply(cfg, params, s, a, r, t, mask), theirs[1], mask)


def test_export_hf_round_trip(hf_dir, tmp_path):
    model, path = hf_dir
    cfg, params = interop.import_hf(path, context_len=K)
    out = interop.export_hf(cfg, params, tmp_path / "export")
    reloaded = transformers.DecisionTransformerModel.from_pretrained(out).eval()
    inputs = _inputs()
    for ours, theirs in zip(_hf_forward(reloaded, *inputs), _hf_forward(model, *inputs)):
        _assert_close(ours.numpy(), theirs, inputs[-1])
    cfg2, params2 = interop.import_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)  # same tree, bit-identical leaves

    with pytest.raises(FileExistsError, match="overwrite"):
        interop.export_hf(cfg, params, out)
    interop.export_hf(cfg, params, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temp folders left
    with pytest.raises(interop.InteropError, match="before embed_ln"):
        interop.export_hf(cfg.replace(timestep_embedding="after_ln"), params, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


class TorchReferenceDT(torch.nn.Module):
    """The reference's DT written here in torch: the timestep embedding is added after embed_ln,
    and the GPT-2 trunk adds no position embedding (wpe is zeroed before the forward). With
    several tasks the per-task heads sit in ModuleLists (the layout of the re-save recipe),
    while predict_state (sized for task 0) and predict_return are shared, as in the reference."""

    HEADS = ("embed_return", "embed_state", "embed_action", "embed_ln", "predict_action")

    def __init__(self, dims, activation):
        super().__init__()
        nn = torch.nn
        self.transformer = transformers.GPT2Model(transformers.GPT2Config(
            n_embd=H, n_layer=L, n_head=NH, n_positions=64, vocab_size=7, activation_function=activation))
        self.embed_timestep = nn.Embedding(T, H)
        heads = [dict(embed_return=nn.Linear(1, H), embed_state=nn.Linear(s, H), embed_action=nn.Linear(a, H),
                      embed_ln=nn.LayerNorm(H), predict_action=nn.Sequential(nn.Linear(H, a), nn.Tanh()))
                 for s, a in dims]
        self.single = len(dims) == 1
        for name in self.HEADS:
            if self.single:
                setattr(self, name, heads[0][name])
            else:
                setattr(self, name + "s", nn.ModuleList([h[name] for h in heads]))
        self.predict_state, self.predict_return = nn.Linear(H, dims[0][0]), nn.Linear(H, 1)

    def head(self, name, task):
        return getattr(self, name) if self.single else getattr(self, name + "s")[task]

    def forward(self, s, a, r, t, mask, task=0):
        B = s.shape[0]
        x = torch.stack([self.head("embed_return", task)(r), self.head("embed_state", task)(s),
                         self.head("embed_action", task)(a)], dim=2).reshape(B, 3 * K, H)
        x = self.head("embed_ln", task)(x) + self.embed_timestep(t).repeat_interleave(3, dim=1)
        h = self.transformer(inputs_embeds=x, attention_mask=mask.repeat_interleave(3, dim=1)).last_hidden_state
        x_state, x_action = h.reshape(B, K, 3, H).unbind(2)[1:]
        return self.predict_state(x_action), self.head("predict_action", task)(x_state), self.predict_return(x_action)


def _reference(dims, tmp_path, activation="gelu_new"):
    """A perturbed TorchReferenceDT, saved as a state dict with the reference's extras (nonzero
    wpe, GPT-2 attention buffers); wpe is then zeroed in the live model, as the reference never adds it."""
    model = _perturb(TorchReferenceDT(dims, activation), seed=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(L):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8)).view(1, 1, 64, 64)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    path = tmp_path / "ref.pt"
    torch.save(sd, path)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    return model, path, sd


@pytest.mark.parametrize("dims", [[(S, A)], [(S, A), (S + 2, A - 1)]], ids=["single", "multi"])
def test_import_reference_matches_torch(tmp_path, dims):
    model, path, _ = _reference(dims, tmp_path)
    names = ["a", "b"][:len(dims)] if len(dims) > 1 else None
    cfg, params = interop.import_reference(path, n_head=NH, context_len=K, activation="gelu_new", task_names=names)
    assert (cfg.timestep_embedding, cfg.n_layer, cfg.hidden_size, cfg.max_ep_len) == ("after_ln", L, H, T)
    assert [(t.state_dim, t.act_dim) for t in cfg.tasks] == ([] if len(dims) == 1 else dims)
    for task, (sd, ad) in enumerate(dims):
        s, a, r, t, mask = _inputs(sd, ad)
        with torch.no_grad():
            theirs = model(torch.tensor(s), torch.tensor(a), torch.tensor(r), torch.tensor(t), torch.tensor(mask), task)
        pad = lambda x, w: np.pad(x, [(0, 0), (0, 0), (0, w - x.shape[-1])])
        task_id = np.full((3,), task) if cfg.multi else None
        ours = dt.apply(cfg, params, pad(s, cfg.state_dim), pad(a, cfg.act_dim), r, t, mask, task_id, outputs="all")
        _assert_close(ours[1], theirs[1], mask)  # actions
        _assert_close(ours[2], theirs[2], mask)  # returns (the shared head)
        if sd == dims[0][0]:
            _assert_close(ours[0], theirs[0], mask)  # the shared state head fits tasks of task 0's width


def test_reference_whole_pickled_module_is_refused_with_a_recipe(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(TorchReferenceDT([(S, A)], "relu"), path)
    with pytest.raises(interop.InteropError, match=r"(?s)TorchReferenceDT.*state_dict\(\)"):
        interop.import_reference(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return open, (self.marker, "w")


def test_malicious_pickle_is_refused(hf_dir, tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"embed_state.weight": torch.zeros(H, S), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(interop.InteropError, match="refused to unpickle"):
        interop.import_reference(tmp_path / "evil.pt")
    hf_evil = tmp_path / "hf"
    hf_evil.mkdir()
    (hf_evil / "config.json").write_text(open(os.path.join(hf_dir[1], "config.json")).read())
    os.rename(tmp_path / "evil.pt", hf_evil / "pytorch_model.bin")
    with pytest.raises(interop.InteropError, match="weights_only=True"):
        interop.import_hf(hf_evil)
    assert not os.path.exists(marker)


def test_bad_state_dicts_and_configs_are_refused(hf_dir, tmp_path):
    model, path = hf_dir
    config = model.config.to_dict()
    sd = dict(model.state_dict())
    del sd["encoder.h.1.mlp.c_fc.bias"]
    sd["embed_state.weight"] = torch.zeros(H, S + 1)
    sd["bogus.weight"] = torch.zeros(2)
    with pytest.raises(interop.InteropError) as e:
        interop.import_hf(sd, config)
    for part in ("missing encoder.h.1.mlp.c_fc.bias", "unexpected bogus.weight", "embed_state.weight: shape (32, 6)"):
        assert part in str(e.value)
    bad_configs = [("activation_function", "silu", "silu"), ("scale_attn_by_inverse_layer_idx", True, "not supported"),
                   ("layer_norm_epsilon", 1e-6, "embed_ln"), ("attn_pdrop", 0.2, "dropout=")]
    for key, value, why in bad_configs:
        with pytest.raises(interop.InteropError, match=why):
            interop.import_hf(model.state_dict(), {**config, key: value})
    _, ref_path, ref_sd = _reference([(S, A)], tmp_path, activation="relu")
    del ref_sd["transformer.h.0.attn.c_proj.weight"]
    with pytest.raises(interop.InteropError, match=r"missing transformer\.h\.0\.attn\.c_proj\.weight"):
        interop.import_reference(ref_sd)
    with pytest.raises(interop.InteropError, match="activation"):
        interop.import_reference(ref_path, activation="swish")


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_convert_cli(hf_dir, tmp_path):
    _, path = hf_dir
    out = tmp_path / "ckpt"
    done = _convert("--from=hf", f"--src={path}", f"--out={out}", f"--context_len={K}")
    assert done.returncode == 0, done.stderr
    cfg, params, meta = checkpoint.load(out)
    want_cfg, want = interop.import_hf(path, context_len=K)
    assert cfg == want_cfg and meta["converted_from"] == "hf"
    jax.tree.map(np.testing.assert_array_equal, params, want)

    done = _convert("--to=hf", f"--src={out}", f"--out={tmp_path / 'hf'}")
    assert done.returncode == 0, done.stderr
    assert interop.import_hf(tmp_path / "hf")[0] == cfg

    done = _convert("--from=hf", f"--src={tmp_path / 'nope'}", f"--out={tmp_path / 'o'}")
    assert done.returncode != 0 and "does not exist" in done.stderr
