"""Decision Transformer in Flax linen: a GPT-2 pre-LN trunk over (rtg, state, action) tokens.

Params are plain nested dicts. Single-task layout::

    embed_timestep/embedding            (max_ep_len, H)
    embed_return|embed_state|embed_action/{kernel,bias}
    embed_ln/{scale,bias}
    block_{i}/ln_1, attn/{c_attn,c_proj}, ln_2, mlp/{c_fc,c_proj}
    ln_f/{scale,bias}
    predict_action|predict_state|predict_return/{kernel,bias}

Multi-task (``config.tasks`` non-empty): the trunk (``embed_timestep``, ``block_*``, ``ln_f``) is
shared and every task owns ``task_{name}/{embed_return,embed_state,embed_action,embed_ln,
predict_action,predict_state,predict_return}``. Inputs are padded to the widest state and action,
and ``task_id`` (B,) routes each sample through its own task's heads, so one call runs a batch
that mixes tasks and every task's heads receive gradients.

Kernels are stored (in, out), exactly like GPT-2's Conv1D, and attention uses one fused qkv
kernel ``c_attn`` (H, 3H), so interop with PyTorch checkpoints is a copy.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu", "gelu_new")
TIMESTEP_ORDERS = ("after_ln", "before_ln")
INIT_SCHEMES = ("gpt2", "reference")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    state_dim: int
    act_dim: int


@dataclasses.dataclass(frozen=True)
class DTConfig:
    """Everything needed to rebuild a DT. Serialises to JSON (`to_dict` / `from_dict`).

    timestep_embedding: 'after_ln' adds the timestep embedding after `embed_ln` (the reference
      merging code, default); 'before_ln' adds it to each token before `embed_ln` (original DT,
      transformers' DecisionTransformerModel).
    init_scheme: 'gpt2' initialises every Linear/Embed N(0, 0.02) (DESIGN.md, HF); 'reference'
      uses PyTorch's defaults for the DT's own embeddings and heads (U(+-1/sqrt(fan_in)),
      Embedding N(0, 1)), as the reference code did, with N(0, 0.02) inside the GPT-2 trunk.
    """

    state_dim: int = 11
    act_dim: int = 3
    hidden_size: int = 128
    n_layer: int = 3
    n_head: int = 1
    context_len: int = 20
    max_ep_len: int = 1000
    dropout: float = 0.1
    activation: str = "relu"
    action_tanh: bool = True
    timestep_embedding: str = "after_ln"
    n_inner: int | None = None
    layer_norm_eps: float = 1e-5
    init_scheme: str = "gpt2"
    tasks: tuple[TaskSpec, ...] = ()

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"DTConfig.{field}: {why}")

        for f in ("state_dim", "act_dim", "hidden_size", "n_layer", "n_head", "context_len", "max_ep_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, f"must be a positive int, got {v!r}")
        if self.hidden_size % self.n_head:
            bad("n_head", f"hidden_size={self.hidden_size} is not divisible by n_head={self.n_head}")
        if not 0.0 <= float(self.dropout) < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"unknown {self.activation!r}; choose from {ACTIVATIONS}")
        if self.timestep_embedding not in TIMESTEP_ORDERS:
            bad("timestep_embedding", f"unknown {self.timestep_embedding!r}; choose from {TIMESTEP_ORDERS}")
        if self.init_scheme not in INIT_SCHEMES:
            bad("init_scheme", f"unknown {self.init_scheme!r}; choose from {INIT_SCHEMES}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            bad("n_inner", f"must be None or a positive int, got {self.n_inner!r}")
        tasks = tuple(t if isinstance(t, TaskSpec) else TaskSpec(*t) if isinstance(t, (list, tuple)) else TaskSpec(**t)
                      for t in self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if tasks:
            names = [t.name for t in tasks]
            if len(set(names)) != len(names):
                bad("tasks", f"duplicate task names {names}")
            for t in tasks:
                if t.state_dim <= 0 or t.act_dim <= 0:
                    bad("tasks", f"task {t.name!r} has non-positive dims")
            if self.state_dim != max(t.state_dim for t in tasks) or self.act_dim != max(t.act_dim for t in tasks):
                bad("state_dim", "with tasks, state_dim/act_dim must be the widest task's "
                    f"({max(t.state_dim for t in tasks)}, {max(t.act_dim for t in tasks)}); "
                    "build it with DTConfig.multi_task(...)")

    @classmethod
    def multi_task(cls, tasks: Sequence[TaskSpec | tuple], **kw) -> "DTConfig":
        tasks = tuple(t if isinstance(t, TaskSpec) else TaskSpec(*t) for t in tasks)
        return cls(state_dim=max(t.state_dim for t in tasks), act_dim=max(t.act_dim for t in tasks),
                   tasks=tasks, **kw)

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.hidden_size

    @property
    def multi(self) -> bool:
        return bool(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task_index(self, name: str) -> int:
        if name not in self.task_names:
            raise ValueError(f"unknown task {name!r}; this model has tasks {self.task_names}")
        return self.task_names.index(name)

    def replace(self, **kw) -> "DTConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = [dataclasses.asdict(t) for t in self.tasks]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "DTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"DTConfig.from_dict: expected a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"DTConfig: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        d["tasks"] = tuple(TaskSpec(**t) if isinstance(t, dict) else TaskSpec(*t) for t in d.get("tasks", ()))
        return cls(**d)


def _normal(std):
    return nn.initializers.normal(stddev=std)


def _torch_uniform(fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """y = x @ kernel[:, cols] + bias[cols]; kernel is (in, out) like GPT-2's Conv1D.

    `cols` lets one call use a column block of a fused kernel (e.g. only q of qkv).
    """

    features: int
    std: float | None = 0.02  # None: PyTorch's default nn.Linear init

    @nn.compact
    def __call__(self, x, cols: slice | None = None):
        fan_in = x.shape[-1]
        if self.std is None:
            kinit = binit = _torch_uniform(fan_in)
        else:
            kinit, binit = _normal(self.std), nn.initializers.zeros_init()
        kernel = self.param("kernel", kinit, (fan_in, self.features), jnp.float32)
        bias = self.param("bias", binit, (self.features,), jnp.float32)
        if cols is not None:
            kernel, bias = kernel[:, cols], bias[cols]
        # a 2-D matmul: XLA:CPU runs the weight gradient of a (B, T, in) dot with two contracting
        # dims about 2x slower than the same product on the flattened (B*T, in) view
        y = jnp.dot(x.reshape(-1, fan_in), kernel) + bias
        return y.reshape(x.shape[:-1] + y.shape[-1:])


def layer_norm(cfg: DTConfig, name: str):
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


def _activation(name):
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return lambda x: jax.nn.gelu(x, approximate=True)  # gelu_new


def _mix32(x):
    """A bijective 32-bit integer hash (Wellons' "lowbias32": two xorshift-multiply rounds)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_bits(key: jax.Array, shape) -> jax.Array:
    """uint32 random words of `shape` from a counter hash of (element index, key).

    ``mix32(mix32(i + k0) ^ k1)`` for flat index i and the key's two 32-bit words: a bijection of
    i for every key, and elementwise, so XLA fuses it into the consumer and no random words ever
    reach memory. It is for dropout masks (cheap and adequate), not a general-purpose PRNG.
    """
    k = jax.random.key_data(key).reshape(-1)
    n = math.prod(shape)
    if n >= 2 ** 32:
        raise ValueError(f"dropout_bits: {n} elements exceed the 2**32 counter space")
    i = jax.lax.iota(jnp.uint32, n).reshape(shape)
    return _mix32(_mix32(i + k[0]) ^ k[-1])


class Dropout(nn.Module):
    """Inverted dropout with masks from a fused counter hash (`dropout_bits`).

    flax's Dropout draws one threefry word per element and materialises the words; on this 2-core
    CPU the masks of one H128 training step cost ~32 ms that way, ~9 ms with RngBitGenerator
    words, and about 1 ms here, where the hash is computed inside the fusion that applies the
    mask. The key comes from the module's 'dropout' rng as in flax, so the same seed gives the same
    masks. An element is dropped when its word is below round(rate * 2**32) (probability rate
    to within 2**-33) and kept values are scaled by 2**32 / (2**32 - threshold), so the layer is
    unbiased.
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        thr = min(round(self.rate * 2 ** 32), 2 ** 32 - 1)
        keep = dropout_bits(self.make_rng("dropout"), x.shape) >= jnp.uint32(thr)
        return jnp.where(keep, x * (2 ** 32 / (2 ** 32 - thr)), 0.0).astype(x.dtype)


def _rows(x, rows, axis: int):
    """x's rows `rows` along `axis`: a static slice, or one row at a traced index (kept as an axis
    of size 1)."""
    if isinstance(rows, slice):
        return x[(slice(None),) * (axis % x.ndim) + (rows,)]
    return jax.lax.dynamic_slice_in_dim(x, rows, 1, axis=axis)


class Block(nn.Module):
    """GPT-2 pre-LN block. With `query_rows` (a static slice, or one row at a traced index), only
    those token rows are updated (the keys and values still come from every token): the output
    equals the full block's at those rows. `qkv_only` returns the attention's q, k, v projection of
    ln_1(x) (B, T, 3H); `qkv` given instead takes the q, k, v from it (x is still the block's input,
    the residual): block 0's are a function of each token alone, so an evaluation caches them."""

    cfg: DTConfig

    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool, query_rows=None, qkv=None, qkv_only: bool = False):
        cfg = self.cfg
        drop = lambda y: Dropout(cfg.dropout)(y, deterministic=deterministic)
        attn = _Attention(cfg, name="attn")
        h = layer_norm(cfg, "ln_1")(x) if qkv is None else None
        if qkv_only:
            return attn(h, None, deterministic=True, query_rows=None, qkv_only=True)
        a = attn(h, bias, deterministic=deterministic, query_rows=query_rows, qkv=qkv)
        x = (x if query_rows is None else _rows(x, query_rows, 1)) + drop(a)
        return x + drop(_MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(x)))


class _Attention(nn.Module):
    cfg: DTConfig

    @nn.compact
    def __call__(self, h, bias, *, deterministic: bool, query_rows, qkv=None, qkv_only: bool = False):
        cfg = self.cfg
        H, nh = cfg.hidden_size, cfg.n_head
        hd = H // nh
        c_attn = Linear(3 * H, name="c_attn")
        if qkv_only:
            return c_attn(h)
        if qkv is not None:  # given (block 0's, cached per token)
            q, k, v = jnp.split(qkv, 3, axis=-1)
            if query_rows is not None:
                q = _rows(q, query_rows, 1)
        elif query_rows is None:
            q, k, v = jnp.split(c_attn(h), 3, axis=-1)
        else:
            q = c_attn(_rows(h, query_rows, 1), cols=slice(0, H))
            k, v = jnp.split(c_attn(h, cols=slice(H, 3 * H)), 2, axis=-1)
        if query_rows is not None:
            bias = _rows(bias, query_rows, 2)
        B = k.shape[0]
        heads = lambda y: y.reshape(B, y.shape[1], nh, hd)
        q, k, v = heads(q), heads(k), heads(v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(hd)) + bias
        probs = jax.nn.softmax(logits, axis=-1)
        probs = Dropout(cfg.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, q.shape[1], H)
        return Linear(H, std=0.02 / math.sqrt(2 * cfg.n_layer), name="c_proj")(out)


class _MLP(nn.Module):
    cfg: DTConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.cfg
        h = _activation(cfg.activation)(Linear(cfg.inner_dim, name="c_fc")(h))
        return Linear(cfg.hidden_size, std=0.02 / math.sqrt(2 * cfg.n_layer), name="c_proj")(h)


class _TaskIO(nn.Module):
    """A task's own input embeddings, `embed_ln` and output heads."""

    cfg: DTConfig
    state_dim: int
    act_dim: int

    def setup(self):
        cfg = self.cfg
        H = cfg.hidden_size
        head_std = None if cfg.init_scheme == "reference" else 0.02
        self.embed_return = Linear(H, std=head_std)
        self.embed_state = Linear(H, std=head_std)
        self.embed_action = Linear(H, std=head_std)
        self.embed_ln = layer_norm(cfg, "embed_ln")
        self.predict_state = Linear(self.state_dim, std=head_std)
        self.predict_action = Linear(self.act_dim, std=head_std)
        self.predict_return = Linear(1, std=head_std)

    def embed(self, states, actions, rtg, time_emb):
        cfg = self.cfg
        r = self.embed_return(rtg)
        s = self.embed_state(states[..., : self.state_dim])
        a = self.embed_action(actions[..., : self.act_dim])
        if cfg.timestep_embedding == "before_ln":
            r, s, a = r + time_emb, s + time_emb, a + time_emb
        B, K, H = s.shape
        x = jnp.stack([r, s, a], axis=2).reshape(B, 3 * K, H)
        x = self.embed_ln(x)
        if cfg.timestep_embedding == "after_ln":
            x = x + jnp.repeat(time_emb, 3, axis=1)
        return x

    def action(self, x_state):
        y = self.predict_action(x_state)
        return jnp.tanh(y) if self.cfg.action_tanh else y

    def state_return(self, x_action):
        return self.predict_state(x_action), self.predict_return(x_action)

    def __call__(self, states, actions, rtg, time_emb):  # used only to create every param at init
        x = self.embed(states, actions, rtg, time_emb)
        return self.action(x), self.state_return(x)


class DecisionTransformer(nn.Module):
    """Call signature: (states (B,K,S), actions (B,K,A), rtg (B,K,1), timesteps (B,K) int,
    mask (B,K) or None, task_id (B,) int for multi-task) -> action preds (B,K,A).

    `outputs='action'` (default) returns the action predictions and computes the last block only
    at the state tokens, which is all the action head reads (exact, ~18% fewer FLOPs at L3).
    `outputs='last'` returns only the last step's action (B, A), as a policy needs: the last block
    runs for that one token. `outputs='all'` returns (state_preds, action_preds, return_preds) like
    transformers.
    """

    cfg: DTConfig

    def setup(self):
        cfg = self.cfg
        temb_init = _normal(1.0) if cfg.init_scheme == "reference" else _normal(0.02)
        self.embed_timestep = nn.Embed(cfg.max_ep_len, cfg.hidden_size, embedding_init=temb_init)
        self.blocks = [Block(cfg, name=f"block_{i}") for i in range(cfg.n_layer)]
        self.ln_f = layer_norm(cfg, "ln_f")
        self.embed_drop = Dropout(cfg.dropout)
        if cfg.multi:
            self.task_io = [_TaskIO(cfg, t.state_dim, t.act_dim, name=f"task_{t.name}") for t in cfg.tasks]
        else:
            self.io = _TaskIO(cfg, cfg.state_dim, cfg.act_dim)
            nn.share_scope(self, self.io)  # single-task params stay flat: embed_state/..., not io/...

    def _ios(self):
        return self.task_io if self.cfg.multi else [self.io]

    def _select(self, per_task, task_id, width=None):
        """Pick each sample's own task's output (arrays padded on the last axis to `width`)."""
        if not self.cfg.multi:
            return per_task[0]
        if width is not None:
            per_task = [jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, width - y.shape[-1])]) for y in per_task]
        out = per_task[0]
        for t, y in enumerate(per_task[1:], start=1):
            sel = (task_id == t).reshape((-1,) + (1,) * (y.ndim - 1))
            out = jnp.where(sel, y, out)
        return out

    def _task_ids(self, task_id, B: int):
        """task_id as (B,) int32 (one task for the whole batch is broadcast here, not by every
        caller); None for a single-task model."""
        if self.cfg.multi and task_id is None:
            raise ValueError("multi-task DT needs task_id: an int, or (B,) ints")
        if task_id is None:
            return None
        if jnp.ndim(task_id) not in (0, 1) or (jnp.ndim(task_id) == 1 and jnp.shape(task_id)[0] != B):
            raise ValueError(f"task_id: expected an int or shape ({B},), got shape {jnp.shape(task_id)}")
        return jnp.broadcast_to(jnp.asarray(task_id, jnp.int32), (B,))

    def step_tokens(self, states, actions, rtg, timesteps, task_id=None):
        """The tokens of steps (B, n, ...) at block 0's input, x0 (B, 3n, H) (rtg, state, action
        per step, as `__call__` embeds them, dropout off), and their block-0 q, k, v (B, 3n, 3H).
        Both are functions of each token alone (its own embedding, embed_ln, timestep, ln_1 and
        c_attn), so an evaluation computes them once per token and caches them (`act_cached`)."""
        task_id = self._task_ids(task_id, states.shape[0])
        time_emb = self.embed_timestep(timesteps)
        x = self._select([io.embed(states, actions, rtg, time_emb) for io in self._ios()], task_id)
        return x, self.blocks[0](x, None, deterministic=True, qkv_only=True)

    def act_cached(self, x0, qkv, bias, query_row, task_id=None):
        """The action (B, A) predicted at token `query_row` (a traced int; a state token) from
        `step_tokens`' x0 (B, T, H) and qkv (B, T, 3H) of T tokens in any order, `bias` (B or 1,
        1, T, T) their additive attention mask (which encodes the causal order). Equals `__call__`'s
        action at that token for the same tokens in time order (dropout off), up to float rounding:
        block 0 takes its q, k, v from `qkv`, and the last block runs for the query token only."""
        task_id = self._task_ids(task_id, x0.shape[0])
        blocks = self.blocks
        if len(blocks) == 1:
            x_s = blocks[0](x0, bias, deterministic=True, qkv=qkv, query_rows=query_row)
        else:
            x = blocks[0](x0, bias, deterministic=True, qkv=qkv)
            for blk in blocks[1:-1]:
                x = blk(x, bias, deterministic=True)
            x_s = blocks[-1](x, bias, deterministic=True, query_rows=query_row)
        x_s = self.ln_f(x_s)
        return self._select([io.action(x_s) for io in self._ios()], task_id, self.cfg.act_dim)[:, 0]

    def __call__(self, states, actions, rtg, timesteps, mask=None, task_id=None, *,
                 deterministic: bool = True, outputs: str = "action"):
        cfg = self.cfg
        B, K = states.shape[:2]
        task_id = self._task_ids(task_id, B)
        if mask is None:
            mask = jnp.ones((B, K), jnp.float32)
        time_emb = self.embed_timestep(timesteps)
        ios = self._ios()
        if self.is_initializing():  # touch every head once so all params exist
            for io in ios:
                io(states, actions, rtg, time_emb)
        x = self._select([io.embed(states, actions, rtg, time_emb) for io in ios], task_id)
        x = self.embed_drop(x, deterministic=deterministic)

        tok_mask = jnp.repeat(mask.astype(bool), 3, axis=1)  # (B, 3K)
        T = 3 * K
        causal = jnp.tril(jnp.ones((T, T), bool))
        allowed = causal[None] & tok_mask[:, None, :]
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # (B,1,T,T)

        if outputs in ("action", "last"):
            rows = slice(1, None, 3)
            if outputs == "last":  # only the last state token; the trailing action token is unused
                x, bias, rows = x[:, :-1], bias[..., :-1, :-1], slice(T - 2, T - 1)
            for blk in self.blocks[:-1]:
                x = blk(x, bias, deterministic=deterministic)
            x_s = self.ln_f(self.blocks[-1](x, bias, deterministic=deterministic, query_rows=rows))
            out = self._select([io.action(x_s) for io in ios], task_id, cfg.act_dim)
            return out[:, 0] if outputs == "last" else out
        if outputs != "all":
            raise ValueError(f"outputs must be 'action', 'last' or 'all', got {outputs!r}")
        for blk in self.blocks:
            x = blk(x, bias, deterministic=deterministic)
        x = self.ln_f(x).reshape(B, K, 3, cfg.hidden_size)
        action = self._select([io.action(x[:, :, 1]) for io in ios], task_id, cfg.act_dim)
        sr = [io.state_return(x[:, :, 2]) for io in ios]
        state = self._select([s for s, _ in sr], task_id, cfg.state_dim)
        ret = self._select([r for _, r in sr], task_id)
        return state, action, ret


def init_params(cfg: DTConfig, rng: jax.Array) -> dict:
    """Fresh params as a plain nested dict (no FrozenDict, no 'params' wrapper)."""
    variables = DecisionTransformer(cfg).init(rng, *_dummy(cfg))
    return _plain(variables["params"])


def _plain(tree):
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _dummy(cfg: DTConfig, batch: int = 1):
    K = cfg.context_len
    return (jnp.zeros((batch, K, cfg.state_dim)), jnp.zeros((batch, K, cfg.act_dim)), jnp.zeros((batch, K, 1)),
            jnp.zeros((batch, K), jnp.int32), jnp.ones((batch, K)),
            jnp.zeros((batch,), jnp.int32) if cfg.multi else None)


def param_shapes(cfg: DTConfig) -> Any:
    """Param shapes/dtypes without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))


def apply(cfg: DTConfig, params, states, actions, rtg, timesteps, mask=None, task_id=None, *,
          rng: jax.Array | None = None, outputs: str = "action"):
    """Pure forward. Dropout is on iff `rng` is given (train mode)."""
    rngs = {"dropout": rng} if rng is not None else None
    return DecisionTransformer(cfg).apply({"params": params}, states, actions, rtg, timesteps, mask, task_id,
                                          deterministic=rng is None, outputs=outputs, rngs=rngs)


def step_tokens(cfg: DTConfig, params, states, actions, rtg, timesteps, task_id=None):
    """(x0, qkv): the tokens of steps (B, n, ...) at block 0's input and their block-0 q, k, v
    (`DecisionTransformer.step_tokens`; eval mode)."""
    return DecisionTransformer(cfg).apply({"params": params}, states, actions, rtg, timesteps, task_id,
                                          method="step_tokens")


def act_cached(cfg: DTConfig, params, x0, qkv, bias, query_row, task_id=None):
    """The action at token `query_row` from cached block-0 inputs (`DecisionTransformer.act_cached`;
    eval mode)."""
    return DecisionTransformer(cfg).apply({"params": params}, x0, qkv, bias, query_row, task_id,
                                          method="act_cached")


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
