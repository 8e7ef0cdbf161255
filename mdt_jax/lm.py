"""The paper's common pre-trained initialisation, the language path: a GPT-2 LM trunk for the DT.

Lawson & Qureshi (2023) start every single-task DT from ChibiT, a small GPT-2 language model
pretrained on WikiText-103, following Reid et al. (2022, "Can Wikipedia help offline RL?",
github.com/machelreid/can-wikipedia-help-offline-rl). The facts below come from the merging
reference (github.com/daniellawson9999/merging-decision-transformers); its README trains each
task's DT with ``lm_cotraining/experiment.py --pretrained_lm ChibiT --extend_positions
--gpt_kmeans 1000 --gpt_kmeans_const 0.1 --kmeans_cache chibi_1000.pt --init_reg 1e-4``.

Initialisation (``lm_cotraining/decision_transformer/models/decision_transformer.py``):
- the GPT-2 trunk (blocks and ``ln_f``) is the LM's; the DT's width is the LM's ``n_embd``.
  `init_trunk_from_lm` copies them and raises on any mismatch of width, depth, heads, MLP width,
  activation or LayerNorm eps (our config must already describe the LM's trunk).
- ``--extend_positions`` (on by default in that script) makes the LM's ``wpe`` the timestep
  embedding, ``embed_timestep = transformer.wpe``; when ``max_ep_len > n_positions`` the table is
  lengthened by keeping rows 0-1 and tiling rows ``2:`` (``step = n_positions - 2``).
  `extend_positions` computes it; ``init_trunk_from_lm(..., timestep_from_wpe=True)`` uses it.
  Deviation: the reference's loop stops at ``k < max_ep_len - 1`` and can leave the last row
  uninitialised (``new_empty``); ours fills every row. The LM's wpe is never added to the DT
  tokens (``use_positional=False``), as in our trunk.

k-means cosine loss (``lm_cotraining/decision_transformer/training/seq_trainer.py``):
- centroids: ``kmeans_pytorch.kmeans(X=wte, num_clusters=1000, distance='cosine')``: k distinct
  random tokens as the start, each token assigned to the centre of largest cosine similarity,
  each centre the plain (unnormalised) mean of its tokens, until the squared summed centre shift
  is below 1e-4. `lm_centroids` does the same with a seeded start and a bounded iteration count;
  deviation: an empty cluster keeps its previous centre (kmeans_pytorch gives it a NaN mean).
- ``kmeans_cosine_max_loss(centers, seq)`` is ``-(einsum('iaj,bj->iabj', seq, centers)
  .max(2).values.mean())``: the elementwise product of every token embedding with every centre,
  max over the centres *per hidden dim*, mean over batch, tokens and dims, negated. ``seq`` is
  ``all_embs = embed_ln(stack(return, state, action embeddings))``, before the timestep
  embedding is added and before dropout, every token including left padding. That script passes
  both unnormalised (non-fp16 path); the older ``decision_transformer/training/seq_trainer.py``
  (and can-wikipedia's main code) ``F.normalize`` both first: ``normalize=True`` here.
- weight: ``gpt_kmeans_const * kmeans_anneal(step)`` with ``kmeans_anneal = lambda x: 1 / (1 +
  exp(-(((15000 - x) / (15000 / 10)) - 5)))`` = sigmoid((7500 - x) / 1500): about 0.993 at the
  start, 0.5 at 7.5k, 0.007 at 15k. ``self.step`` is incremented before the call, so the first
  update uses x = 1; `kmeans_weight` takes our 0-based update count and uses x = step + 1. (The
  older seq_trainer anneals over 5000 steps: ``horizon=5000``.)

LM co-training (``--joint``; off in the README command):
- each step adds ``gpt_lm_const`` (default 1, optionally decayed linearly) times the causal-LM
  loss of ``GPT2LMHeadModel`` (the same transformer, ``wpe`` added to the token embeddings, the
  head tied to ``wte``) on WikiText-103 blocks of 1024 tokens, 2 per batch
  (``get_nlp_datasets.py``: the corpus concatenated and cut into block_size chunks, labels =
  input ids, shuffled). `lm_loss` is that mean next-token cross-entropy through our trunk;
  `sample_token_windows` draws aligned chunks with replacement (not an epoch-shuffled pass).
- what is trained there: every LM parameter, ``wte`` and ``wpe`` included (``wpe`` doubles as
  the timestep embedding). Here the trunk is trained; ``wpe`` is trained only as the DT's own
  ``embed_timestep`` when the LM loss reads its positions from there (``timestep_from_wpe``);
  deviation: ``wte`` (input and tied output embedding) stays frozen, since the DT's params have
  no place for it. The k-means centroids are constants in both.
- the reference's optimiser for an LM-initialised model is AdamW with eps 1e-6 (``utils.py``);
  ours is `mdt_jax.train`'s.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import interop
from mdt_jax import trees
from mdt_jax.interop import InteropError
from mdt_jax.models.dt import Block, DecisionTransformer, DTConfig, Dropout, layer_norm

GPT2_DEFAULTS = dict(  # transformers.GPT2Config defaults, for keys a config.json omits
    model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True)
KMEANS_HORIZON = 15_000  # lm_cotraining/.../seq_trainer.py: kmeans_anneal over 15000 steps


@dataclasses.dataclass(frozen=True)
class LMTrunk:
    """A GPT-2 LM's trunk in our DT layout (``block_{i}/...``, ``ln_f``), and its token (``wte``,
    (vocab, H)) and position (``wpe``, (n_positions, H)) embeddings, as float32 numpy arrays."""

    params: dict
    wte: np.ndarray
    wpe: np.ndarray
    n_embd: int
    n_layer: int
    n_head: int
    activation_function: str
    layer_norm_epsilon: float
    n_inner: int | None
    source: str = ""

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def activation(self) -> str:
        """Our DTConfig name for the LM's activation."""
        return interop.HF_ACTIVATIONS[self.activation_function]

    def dt_fields(self) -> dict:
        """The DTConfig fields a DT needs to take this trunk."""
        return dict(hidden_size=self.n_embd, n_layer=self.n_layer, n_head=self.n_head, activation=self.activation,
                    n_inner=None if self.inner_dim == 4 * self.n_embd else self.inner_dim,
                    layer_norm_eps=self.layer_norm_epsilon)

    def config(self) -> dict:
        """The GPT-2 config fields, JSON-ready (for model metadata)."""
        return dict(n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head,
                    activation_function=self.activation_function, layer_norm_epsilon=self.layer_norm_epsilon,
                    n_inner=self.n_inner, vocab_size=int(self.wte.shape[0]), n_positions=int(self.wpe.shape[0]))


def _trunk_rows(cfg: DTConfig) -> list:
    """interop's key table restricted to the trunk (blocks, ln_f), torch names without a prefix."""
    return [r for r in interop.key_table(cfg, "") if r[0] == "ln_f" or r[0].startswith("block_")]


def _gpt2_config(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    c = {**GPT2_DEFAULTS, **raw}
    if c["model_type"] != "gpt2":
        raise InteropError(f"{path}: model_type {c['model_type']!r} is not 'gpt2'")
    interop.check_gpt2_trunk(c, GPT2_DEFAULTS, path)
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] <= 0:
            raise InteropError(f"{path}: {key} must be a positive int, got {c[key]!r}")
    if c["n_embd"] % c["n_head"]:
        raise InteropError(f"{path}: n_embd={c['n_embd']} is not divisible by n_head={c['n_head']}")
    if c["n_inner"] is not None and (not isinstance(c["n_inner"], int) or c["n_inner"] <= 0):
        raise InteropError(f"{path}: n_inner must be null or a positive int, got {c['n_inner']!r}")
    eps = c["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise InteropError(f"{path}: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
    return c


def import_lm(folder: str | os.PathLike) -> LMTrunk:
    """Read a transformers ``save_pretrained`` folder of a ``GPT2Model`` or ``GPT2LMHeadModel``.

    The folder holds config.json and model.safetensors (read with safetensors' numpy loader) or
    pytorch_model.bin (``torch.load(weights_only=True)``, which refuses pickled code). Keys may
    carry the ``transformer.`` prefix of an LM-head model; the attention-mask buffers are ignored,
    and an ``lm_head.weight`` must equal ``wte`` (GPT-2's tied head, the one `lm_loss` uses).
    Every missing, unexpected or mis-shaped key, and any non-finite value, is an `InteropError`
    naming the file and key.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no LM folder at {folder}")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise InteropError(f"{folder}: no config.json (expected a transformers save_pretrained folder)")
    c = _gpt2_config(cfg_path)
    weights, _ = interop.hf_files(folder)
    tensors = interop.read_state_dict(weights)
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(interop.BUFFERS)}
    head = tensors.pop("lm_head.weight", None)
    H = c["n_embd"]
    try:
        probe = DTConfig(state_dim=1, act_dim=1, hidden_size=H, n_layer=c["n_layer"], n_head=c["n_head"],
                         n_inner=c["n_inner"], activation=interop.HF_ACTIVATIONS[c["activation_function"]],
                         layer_norm_eps=float(c["layer_norm_epsilon"]))
    except ValueError as e:
        raise InteropError(f"{cfg_path}: {e}") from None
    rows = _trunk_rows(probe)
    want = {**interop.expected_shapes(probe, rows), "wte.weight": (c["vocab_size"], H), "wpe.weight": (c["n_positions"], H)}
    interop.check_tensors(tensors, want, f"{weights} (GPT-2 LM)")
    for k in sorted(tensors):
        if not np.all(np.isfinite(tensors[k])):
            raise InteropError(f"{weights}: non-finite values in {k}")
    if head is not None and (head.shape != tensors["wte.weight"].shape or not np.array_equal(head, tensors["wte.weight"])):
        raise InteropError(f"{weights}: lm_head.weight is not tied to wte.weight; only GPT-2's tied head is supported")
    params: dict = {}
    for ours, theirs, kind in rows:
        for leaf, tleaf, transpose in interop.LEAVES[kind]:
            a = tensors[f"{theirs}.{tleaf}"]
            trees.set_path(params, f"{ours}/{leaf}", np.ascontiguousarray(a.T if transpose else a, np.float32))
    return LMTrunk(params=params, wte=tensors["wte.weight"], wpe=tensors["wpe.weight"], n_embd=H,
                   n_layer=c["n_layer"], n_head=c["n_head"], activation_function=c["activation_function"],
                   layer_norm_epsilon=float(c["layer_norm_epsilon"]), n_inner=c["n_inner"],
                   source=os.path.abspath(folder))


def check_fits(cfg: DTConfig, lm: LMTrunk) -> None:
    """Raise ValueError naming every DTConfig field that differs from the LM's trunk, with both values."""
    ours = dict(hidden_size=cfg.hidden_size, n_layer=cfg.n_layer, n_head=cfg.n_head, inner_dim=cfg.inner_dim,
                activation=cfg.activation, layer_norm_eps=cfg.layer_norm_eps)
    theirs = dict(hidden_size=lm.n_embd, n_layer=lm.n_layer, n_head=lm.n_head, inner_dim=lm.inner_dim,
                  activation=lm.activation, layer_norm_eps=lm.layer_norm_epsilon)
    bad = [f"{k}: DT {ours[k]!r} vs LM {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]
    if bad:
        raise ValueError(f"the DT does not fit the LM trunk {lm.source or ''}: " + "; ".join(bad))


def extend_positions(wpe: np.ndarray, max_ep_len: int) -> np.ndarray:
    """The reference's ``--extend_positions`` timestep table from an LM's ``wpe`` (n_positions, H):
    its first `max_ep_len` rows, or when longer, rows 0-1 then rows ``2:`` tiled."""
    wpe = np.asarray(wpe, np.float32)
    P = wpe.shape[0]
    if max_ep_len <= P:
        return wpe[:max_ep_len].copy()
    if P <= 2:
        raise ValueError(f"extend_positions: wpe has {P} rows, too few to tile")
    out = np.empty((max_ep_len, wpe.shape[1]), np.float32)
    out[:2] = wpe[:2]
    k = 2
    while k < max_ep_len:
        n = min(max_ep_len - k, P - 2)
        out[k:k + n] = wpe[2:2 + n]
        k += n
    return out


def init_trunk_from_lm(cfg: DTConfig, params, lm: LMTrunk, *, timestep_from_wpe: bool = False) -> dict:
    """`params` (single- or multi-task DT) with ``block_*`` and ``ln_f`` replaced by the LM's, and
    with `timestep_from_wpe` also ``embed_timestep`` by `extend_positions` (the reference's
    ``--extend_positions``). Raises ValueError naming mismatched config fields first."""
    check_fits(cfg, lm)
    missing = [k for k in [f"block_{i}" for i in range(cfg.n_layer)] + ["ln_f", "embed_timestep"] if k not in params]
    if missing:
        raise ValueError(f"init_trunk_from_lm: params lack {missing}; not a DT of this config")
    out = dict(params)
    for k, v in lm.params.items():
        out[k] = jax.tree.map(jnp.asarray, v)
    if timestep_from_wpe:
        out["embed_timestep"] = {"embedding": jnp.asarray(extend_positions(lm.wpe, cfg.max_ep_len))}
    return out


# ---------------------------------------------------------------------------------------------
# The trunk alone, and the two auxiliary losses.

def trunk_apply(cfg: DTConfig, params, x: jax.Array, mask: jax.Array | None = None, *,
                rng: jax.Array | None = None) -> jax.Array:
    """Hidden states ``ln_f(blocks(x))`` (B, T, H) of the DT's trunk on input embeddings `x`
    (causal attention, keys masked where `mask` (B, T) is 0; dropout iff `rng`)."""
    B, T, _ = x.shape
    allowed = jnp.tril(jnp.ones((T, T), bool))[None]
    if mask is not None:
        allowed = allowed & mask.astype(bool)[:, None, :]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]
    keys = list(jax.random.split(rng, cfg.n_layer + 1)) if rng is not None else [None] * (cfg.n_layer + 1)
    det = rng is None
    if not det:
        x = Dropout(cfg.dropout).apply({}, x, deterministic=False, rngs={"dropout": keys[-1]})
    for i in range(cfg.n_layer):
        x = Block(cfg).apply({"params": params[f"block_{i}"]}, x, bias, deterministic=det,
                             rngs=None if det else {"dropout": keys[i]})
    return layer_norm(cfg, None).apply({"params": params["ln_f"]}, x)


def lm_loss(cfg: DTConfig, params, lm: LMTrunk, tokens: jax.Array, *, rng: jax.Array | None = None,
            wpe: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of `tokens` (B, T) int through our trunk (GPT2LMHeadModel's
    loss): ``x = wte[tokens] + wpe[:T]``, ``logits = trunk(x) @ wte.T``, CE of logits[:, :-1] against
    tokens[:, 1:]. `wpe` replaces ``lm.wpe`` (e.g. the DT's own, trained ``embed_timestep``, which
    the reference shares with the LM); ``wte`` is a constant. Dropout iff `rng`."""
    wte = jnp.asarray(lm.wte)
    pos = jnp.asarray(lm.wpe) if wpe is None else wpe
    T = tokens.shape[1]
    x = wte[tokens] + pos[:T][None]
    h = trunk_apply(cfg, params, x, rng=rng)
    logits = jnp.einsum("bth,vh->btv", h[:, :-1], wte)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def input_embeddings(cfg: DTConfig, params, batch: Mapping) -> jax.Array:
    """The reference's ``all_embs`` (B, 3K, H): ``embed_ln`` of the interleaved return, state and
    action embeddings, before the timestep embedding is added (with ``timestep_embedding=
    'before_ln'`` it is inside, as that order puts it), no dropout; each sample through its own
    task's heads."""
    after = cfg.timestep_embedding == "after_ln"

    def embs(m: DecisionTransformer, states, actions, rtg, timesteps, task_id):
        time = m.embed_timestep(timesteps)
        time = jnp.zeros_like(time) if after else time
        return m._select([io.embed(states, actions, rtg, time) for io in m._ios()], task_id)

    return DecisionTransformer(cfg).apply({"params": params}, batch["states"], batch["actions"], batch["rtg"],
                                          batch["timesteps"], batch.get("task_id"), method=embs)


def kmeans_cosine_loss(embeddings: jax.Array, centroids: jax.Array, mask: jax.Array | None = None, *,
                       normalize: bool = False) -> jax.Array:
    """``-mean_{n,j} max_b e[n, j] * c[b, j]`` over tokens n and hidden dims j (the reference's
    ``-(einsum('iaj,bj->iabj', seq, centers).max(2).values.mean())``).

    For each dim the max over centres of ``e * c_b`` is ``e * max_b c_b`` if e >= 0 else
    ``e * min_b c_b``, so it runs in O(tokens * H), not O(tokens * k * H); the centroids get no
    gradient. `mask` None averages over every token as the reference does (padding included);
    a (B, T) mask averages over its nonzero tokens. `normalize` L2-normalises both first.
    """
    if embeddings.shape[-1] != centroids.shape[-1]:
        raise ValueError(f"kmeans_cosine_loss: embeddings have width {embeddings.shape[-1]}, "
                         f"centroids {centroids.shape[-1]}")
    e = embeddings
    c = jax.lax.stop_gradient(centroids)
    if normalize:
        unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)  # F.normalize
        e, c = unit(e), unit(c)
    best = jnp.where(e >= 0, e * jnp.max(c, axis=0), e * jnp.min(c, axis=0))
    if mask is None:
        return -jnp.mean(best)
    if mask.shape != e.shape[:-1]:
        raise ValueError(f"kmeans_cosine_loss: mask shape {mask.shape} != token shape {e.shape[:-1]}")
    w = mask.astype(e.dtype)[..., None]
    return -jnp.sum(best * w) / jnp.maximum(jnp.sum(w) * e.shape[-1], 1.0)


def kmeans_weight(step, const: float = 0.1, *, horizon: int = KMEANS_HORIZON) -> jax.Array:
    """``const * sigmoid(((horizon - x) / (horizon / 10)) - 5)`` with x = step + 1 (`step`: updates
    already applied, 0-based): the reference's ``gpt_kmeans_const * kmeans_anneal(self.step)``."""
    x = jnp.asarray(step, jnp.float32) + 1.0
    return const * jax.nn.sigmoid((horizon - x) / (horizon / 10) - 5.0)


@functools.partial(jax.jit, static_argnames=("k", "max_iter"))
def _kmeans(x, key, k: int, tol: float, max_iter: int):
    n = x.shape[0]
    init = x[jax.random.choice(key, n, (k,), replace=False)]
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    xn = unit(x)

    def body(carry):
        c, _, it = carry
        assign = jnp.argmax(xn @ unit(c).T, axis=1)  # argmin of 1 - cosine
        counts = jax.ops.segment_sum(jnp.ones_like(x[:, 0]), assign, k)
        means = jax.ops.segment_sum(x, assign, k) / jnp.maximum(counts, 1.0)[:, None]
        new = jnp.where(counts[:, None] > 0, means, c)
        shift = jnp.sum(jnp.sqrt(jnp.sum(jnp.square(new - c), axis=1)))
        return new, shift, it + 1

    cond = lambda carry: (carry[1] ** 2 >= tol) & (carry[2] < max_iter)
    c, _, _ = jax.lax.while_loop(cond, body, (init, jnp.asarray(jnp.inf, x.dtype), 0))
    return c


def lm_centroids(wte, k: int, seed: int = 0, *, tol: float = 1e-4, max_iter: int = 300) -> jax.Array:
    """k-means with cosine assignment over the token embeddings `wte` (vocab, H) -> (k, H), as
    ``kmeans_pytorch.kmeans(distance='cosine')``: start at k distinct tokens drawn with `seed`,
    centres are unnormalised means, stop when (sum of centre shifts)^2 < `tol` or after
    `max_iter` rounds. Jitted; the same seed gives the same centroids."""
    wte = jnp.asarray(wte, jnp.float32)
    if wte.ndim != 2:
        raise ValueError(f"lm_centroids: wte must be (vocab, H), got shape {wte.shape}")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= wte.shape[0]:
        raise ValueError(f"lm_centroids: k must be an int in [1, vocab={wte.shape[0]}], got {k!r}")
    if not bool(jnp.all(jnp.isfinite(wte))):
        raise ValueError("lm_centroids: wte has non-finite values")
    return _kmeans(wte, jax.random.key(seed), k, float(tol), int(max_iter))


# ---------------------------------------------------------------------------------------------
# Token corpora for co-training, and the aux loss the trainer adds.

def load_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """A user's ``.npy`` of token ids: 1-D, integer dtype, values in [0, vocab_size). Read with
    ``allow_pickle=False``; anything else is a ValueError naming the file and its dtype/shape."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token file at {path}")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array of token ids ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{path}: expected one .npy array of token ids, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{path}: token ids must have an integer dtype, got {a.dtype} (shape {a.shape})")
    if a.ndim != 1:
        raise ValueError(f"{path}: token ids must be 1-D, got shape {a.shape} (dtype {a.dtype})")
    if a.size < 2:
        raise ValueError(f"{path}: needs at least 2 tokens, got {a.size}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), found values in [{lo}, {hi}]")
    return a.astype(np.int32)


def sample_token_windows(tokens: jax.Array, key: jax.Array, batch_size: int, seq_len: int) -> jax.Array:
    """(batch_size, seq_len) consecutive chunks of the corpus, at multiples of seq_len (the
    reference's block_size grouping), drawn uniformly with replacement."""
    n_chunks = tokens.shape[0] // seq_len
    starts = jax.random.randint(key, (batch_size,), 0, n_chunks) * seq_len
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(tokens, s, seq_len))(starts)


def make_aux_loss(cfg: DTConfig, lm: LMTrunk, *, centroids: jax.Array | None = None, kmeans_const: float = 0.1,
                  cotrain_weight: float = 0.0, timestep_from_wpe: bool = False,
                  normalize: bool = False) -> Callable:
    """``aux(params, batch, step, key) -> (loss, metrics)`` for `mdt_jax.train`'s ``aux_loss``:
    ``kmeans_weight(step, kmeans_const) * kmeans_cosine_loss(all_embs, centroids)`` when
    `centroids` is given, plus ``cotrain_weight * lm_loss(batch['lm_tokens'])`` when it is > 0
    (positions from the DT's ``embed_timestep`` with `timestep_from_wpe`, as the reference
    shares them; else the LM's frozen ``wpe``)."""

    def aux(params, batch, step, key):
        total, metrics = jnp.zeros(()), {}
        if centroids is not None:
            km = kmeans_cosine_loss(input_embeddings(cfg, params, batch), centroids, normalize=normalize)
            w = kmeans_weight(step, kmeans_const)
            total = total + w * km
            metrics |= {"lm_kmeans": km, "lm_kmeans_weight": w}
        if cotrain_weight > 0:
            wpe = params["embed_timestep"]["embedding"] if timestep_from_wpe else None
            lml = lm_loss(cfg, params, lm, batch["lm_tokens"], rng=key, wpe=wpe)
            total = total + cotrain_weight * lml
            metrics |= {"lm_loss": lml}
        return total, metrics

    return aux


def lm_metadata(lm: LMTrunk) -> dict:
    """What a model's metadata records about the LM it started from."""
    return {"folder": lm.source, "config": lm.config()}


__all__ = ["LMTrunk", "import_lm", "check_fits", "extend_positions", "init_trunk_from_lm", "trunk_apply", "lm_loss",
           "input_embeddings", "kmeans_cosine_loss", "kmeans_weight", "lm_centroids", "load_tokens",
           "sample_token_windows", "make_aux_loss", "lm_metadata", "KMEANS_HORIZON"]
