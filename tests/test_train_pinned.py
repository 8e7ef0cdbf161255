"""A tiny training run's params and loss trace, pinned to values recorded from the code.

Guards refactors of the optimiser plumbing (`mdt_jax.train`): AdamW with decay masked by
`no_decay`, the linear warmup ``lr * min((step + 1) / warmup, 1)``, torch's clipping
``g * min(1, max_norm / (norm + 1e-6))`` over trainable grads only, frozen params, and the
init_reg term, for a single model and for a vmapped two-model sweep over learning rate and weight
decay. Warmup is longer than the run, so every step sees a different learning rate.

The constants were printed by ``python tests/test_train_pinned.py`` from the code before the
optimiser was moved into one optax chain (CPU, float32). Other CPUs sum in other orders
(tests/pinning.py), so they are compared to rtol 2e-5 everywhere (this machine's and the recording
machine's differ by up to 5e-6), and bit for bit (a SHA-256 of the values) on a machine that
recorded its own (`EXACT`). If a deliberate change to the math moves them, re-record them in the
same commit and say why. A third test
checks that the same frozen/no-decay run resumes from a checkpoint bit for bit and that `fit`
refuses a checkpoint whose state tree is not the one it builds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import train as T
from mdt_jax.data import sample_batch, segment_data
from mdt_jax.models import DTConfig
from pinning import digest, fingerprint
from synth import make_dataset

CFG = DTConfig(state_dim=5, act_dim=2, hidden_size=16, n_layer=1, n_head=1, context_len=4, max_ep_len=64)
TCFG = T.TrainConfig(batch_size=8, learning_rate=1e-3, weight_decay=0.1, warmup_steps=50, grad_clip=0.25,
                     freeze=("ln_f", "timestep"), no_decay=("attn",), init_reg=1e-2)
STEPS = 20
LEAVES = ("block_0/attn/c_attn/kernel",   # trained, no decay, anchored by init_reg
          "block_0/mlp/c_fc/kernel",      # trained, decayed, anchored by init_reg
          "predict_action/kernel",        # trained, decayed
          "ln_f/scale",                   # frozen
          "embed_timestep/embedding")     # frozen
FROZEN = ("ln_f/scale", "embed_timestep/embedding")
SWEEP = dict(learning_rate=(1e-3, 3e-3), weight_decay=(0.1, 0.01))


def _data():
    return segment_data(make_dataset(n_traj=6, state_dim=5, act_dim=2, seed=0), context_len=4, max_ep_len=64)


def _sample(d, k):
    return sample_batch(d, k, TCFG.batch_size)


def _leaf(params, path):
    for k in path.split("/"):
        params = params[k]
    return np.asarray(params)


def _summary(params) -> dict:
    """Per pinned leaf: its float64 sum and first three entries (exact float32 values)."""
    return {p: [float(np.sum(_leaf(params, p), dtype=np.float64)), *map(float, _leaf(params, p).ravel()[:3])]
            for p in LEAVES}


def _run(state, data, vmapped):
    """STEPS one-step calls of the jitted chunk: the per-step loss, grad_norm and lr traces."""
    chunk = T.make_train_chunk(CFG, TCFG, _sample, vmapped=vmapped)
    trace = {"loss": [], "grad_norm": [], "lr": []}
    for _ in range(STEPS):
        state, m = chunk(state, data, 1)
        for k in trace:
            trace[k].append(np.asarray(m[k]).tolist())
    return state, trace


def single():
    s0 = T.init_state(CFG, TCFG, jax.random.key(0))
    init = _summary(s0.params)
    s1, trace = _run(s0, _data(), vmapped=False)
    return init, _summary(s1.params), trace


def sweep():
    keys = jax.random.split(jax.random.key(1), 2)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in SWEEP.items()}
    s0 = jax.vmap(lambda k, h: T.init_state(CFG, TCFG, k, **h))(keys, hp)
    data = jax.tree.map(lambda x: jnp.stack([x, x]), _data())
    s1, trace = _run(s0, data, vmapped=True)
    return [_summary(jax.tree.map(lambda v, i=i: v[i], s1.params)) for i in range(2)], trace


# ---- recorded constants (python tests/test_train_pinned.py) ------------------------------------
SINGLE_FINAL = {'block_0/attn/c_attn/kernel': [0.7986408220222074, 0.0032031680457293987, 0.01707521267235279,
                                -0.03477940708398819],
 'block_0/mlp/c_fc/kernel': [0.23196774905045459, 0.017583537846803665, 0.012867284938693047,
                             0.008572446182370186],
 'embed_timestep/embedding': [-0.893554321348347, 0.027854017913341522, 0.013214409351348877,
                              0.02101835608482361],
 'ln_f/scale': [16.0, 1.0, 1.0, 1.0],
 'predict_action/kernel': [-0.08037783042527735, -0.002375868847593665, 0.03354603797197342,
                           -0.016723791137337685]}
SINGLE_TRACE = {'grad_norm': [3.85540771484375, 5.47772741317749, 3.0642831325531006, 3.714139938354492, 2.7657456398010254,
               2.302243947982788, 4.998964309692383, 2.834505319595337, 2.7142395973205566,
               3.8733808994293213, 3.0370140075683594, 3.2158079147338867, 4.5277838706970215,
               3.9081594944000244, 3.4643633365631104, 3.061028242111206, 3.7859914302825928,
               1.842286467552185, 3.546626091003418, 2.524644613265991],
 'loss': [0.668054461479187, 0.6266869306564331, 0.509577751159668, 0.5257489085197449, 0.47413113713264465,
          0.3291347026824951, 0.7012245059013367, 0.4639005661010742, 0.40342843532562256, 0.5115078687667847,
          0.5960986018180847, 0.42718905210494995, 0.6159968972206116, 0.5788875222206116, 0.5446373820304871,
          0.5223079919815063, 0.5312870144844055, 0.3442103862762451, 0.5556086897850037,
          0.2881002128124237],
 'lr': [2.0000001313746907e-05, 4.0000002627493814e-05, 6.000000212225132e-05, 8.000000525498763e-05,
        9.999999747378752e-05, 0.00012000000424450263, 0.00014000000373926014, 0.00016000001050997525,
        0.00018000000272877514, 0.00019999999494757503, 0.00022000001627020538, 0.00024000000848900527,
        0.00026000000070780516, 0.0002800000074785203, 0.00029999998514540493, 0.0003200000210199505,
        0.0003400000277906656, 0.0003600000054575503, 0.0003800000122282654, 0.00039999998989515007]}
SWEEP_FINAL = [{'block_0/attn/c_attn/kernel': [0.5038124577768031, 0.016393357887864113, -0.036853983998298645,
                                 0.019933493807911873],
  'block_0/mlp/c_fc/kernel': [-0.739099338218125, 0.042594652622938156, 0.00688645476475358,
                              -0.0019539142958819866],
  'embed_timestep/embedding': [-0.601869759228066, 0.047555431723594666, 0.023619595915079117,
                               -0.02597041055560112],
  'ln_f/scale': [16.0, 1.0, 1.0, 1.0],
  'predict_action/kernel': [0.028407155885361135, -0.018886199221014977, 0.006764380261301994,
                            0.0022400906309485435]},
 {'block_0/attn/c_attn/kernel': [0.06162536461124546, -0.01525909174233675, -0.021814530715346336,
                                 0.007873193360865116],
  'block_0/mlp/c_fc/kernel': [0.7479464490461396, -0.0014487931039184332, 0.037388917058706284,
                              0.0061182682402431965],
  'embed_timestep/embedding': [-0.31420601981153595, -0.03509914502501488, -0.005758194252848625,
                               0.005098794586956501],
  'ln_f/scale': [16.0, 1.0, 1.0, 1.0],
  'predict_action/kernel': [-0.13587296530022286, -0.03458371013402939, -0.01444617472589016,
                            -0.011666102334856987]}]
SWEEP_TRACE = {'grad_norm': [[2.851012945175171, 4.600122451782227], [4.5103230476379395, 4.288137435913086],
               [2.7529306411743164, 3.565624237060547], [2.3267436027526855, 2.9209794998168945],
               [4.366847515106201, 2.491424322128296], [3.3706841468811035, 2.1111929416656494],
               [2.2334938049316406, 2.7296996116638184], [2.863511800765991, 1.9230599403381348],
               [3.1460843086242676, 1.506806492805481], [4.0093536376953125, 3.7946012020111084],
               [2.6437201499938965, 2.6906914710998535], [2.0101871490478516, 2.4603099822998047],
               [2.888901948928833, 3.071319103240967], [2.9745638370513916, 3.7915658950805664],
               [4.574933052062988, 3.0687742233276367], [3.9822494983673096, 3.715864896774292],
               [3.8287806510925293, 1.841967225074768], [2.5443203449249268, 3.2491660118103027],
               [3.775291919708252, 2.261500835418701], [1.6722382307052612, 2.867997884750366]],
 'loss': [[0.5230090618133545, 0.7468937039375305], [0.8099949359893799, 0.7788257598876953],
          [0.5536556839942932, 0.717022180557251], [0.40275853872299194, 0.4708901047706604],
          [0.7011576294898987, 0.5099990963935852], [0.45419323444366455, 0.3860260844230652],
          [0.41485902667045593, 0.4257764220237732], [0.41324111819267273, 0.442886084318161],
          [0.6393957734107971, 0.37495777010917664], [0.6633481979370117, 0.6225195527076721],
          [0.5707992911338806, 0.5475314855575562], [0.3132639229297638, 0.47228652238845825],
          [0.4926533102989197, 0.6318719983100891], [0.5762636065483093, 0.7560944557189941],
          [0.7301979660987854, 0.5131019353866577], [0.6298210620880127, 0.5762671232223511],
          [0.674816906452179, 0.3388258218765259], [0.48666277527809143, 0.6120356917381287],
          [0.63550865650177, 0.3617987334728241], [0.3442273736000061, 0.5194973349571228]],
 'lr': [[2.0000001313746907e-05, 5.999999848427251e-05], [4.0000002627493814e-05, 0.00011999999696854502],
        [6.000000212225132e-05, 0.00018000000272877514], [8.000000525498763e-05, 0.00023999999393709004],
        [9.999999747378752e-05, 0.00029999998514540493], [0.00012000000424450263, 0.0003600000054575503],
        [0.00014000000373926014, 0.0004199999966658652], [0.00016000001050997525, 0.0004799999878741801],
        [0.00018000000272877514, 0.000539999979082495], [0.00019999999494757503, 0.0005999999702908099],
        [0.00022000001627020538, 0.0006600000197067857], [0.00024000000848900527, 0.0007200000109151006],
        [0.00026000000070780516, 0.0007800000021234155], [0.0002800000074785203, 0.0008399999933317304],
        [0.00029999998514540493, 0.0008999999263323843], [0.0003200000210199505, 0.0009599999757483602],
        [0.0003400000277906656, 0.001019999966956675], [0.0003600000054575503, 0.00107999995816499],
        [0.0003800000122282654, 0.0011399999493733048], [0.00039999998989515007, 0.0011999999405816197]]}


EXACT = {  # {fingerprint: {"single": sha256, "sweep": sha256}}, printed by `python tests/test_train_pinned.py`
    'x86_64|AMD EPYC|avx,avx2,avx512_bf16,avx512_bitalg,avx512_vbmi2,avx512_vnni,avx512_vpopcntdq,avx512bw,avx512cd,avx512dq,avx512f,avx512ifma,avx512vbmi,avx512vl,fma|jaxlib 0.10.2':
        {'single': '9ed3e4b92dd31b5ce7acd204b8aeb776c5431be88cafce6cae468123f54c1256',
         'sweep': 'af6463faf155aacd6d3946b8cb089993e9664c4a67fae9106fe8f565ee71cf8c'},
}


def _check_final(got, want):
    for p in LEAVES:
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), rtol=2e-5, atol=1e-7, err_msg=p)


def _check_trace(got, want):
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5, atol=1e-9, err_msg=k)


def _check_exact(case: str, value) -> None:
    here = EXACT.get(fingerprint(), {})
    if case in here:  # a machine that recorded its own bits
        assert digest(value) == here[case], f"{case}: the run's bits moved on {fingerprint()}"


def _warmup(lr):
    """The reference's warmup in float32: lr * min((step + 1) / warmup, 1) for the run's steps."""
    s = np.arange(STEPS, dtype=np.float32)
    return np.float32(lr) * np.minimum((s + np.float32(1)) / np.float32(TCFG.warmup_steps), np.float32(1))


def test_single_run_matches_the_recorded_params_and_loss_trace():
    init, final, trace = single()
    _check_final(final, SINGLE_FINAL)
    _check_trace(trace, SINGLE_TRACE)
    _check_exact("single", [final, trace])
    for p in FROZEN:
        assert final[p] == init[p], p
    for p in set(LEAVES) - set(FROZEN):
        assert final[p] != init[p], p
    np.testing.assert_allclose(trace["lr"], _warmup(TCFG.learning_rate), rtol=1e-6)
    assert max(trace["grad_norm"]) > TCFG.grad_clip  # the clipping rule is exercised


def test_vmapped_lr_and_decay_sweep_matches_the_recorded_params_and_loss_trace():
    finals, trace = sweep()
    for got, want in zip(finals, SWEEP_FINAL):
        _check_final(got, want)
    _check_trace(trace, SWEEP_TRACE)
    _check_exact("sweep", [finals, trace])
    lr = np.asarray(trace["lr"])
    for i, l in enumerate(SWEEP["learning_rate"]):
        np.testing.assert_allclose(lr[:, i], _warmup(l), rtol=1e-6)


if __name__ == "__main__":
    import pprint

    _, final, trace = single()
    finals, strace = sweep()
    for name, v in (("SINGLE_FINAL", final), ("SINGLE_TRACE", trace), ("SWEEP_FINAL", finals),
                    ("SWEEP_TRACE", strace)):
        print(f"{name} = {pprint.pformat(v, width=110, compact=True)}")
    print("EXACT entry:", pprint.pformat({fingerprint(): {"single": digest([final, trace]),
                                                          "sweep": digest([finals, strace])}}, width=110))


def test_frozen_run_resumes_bit_exact_and_a_foreign_checkpoint_is_refused(tmp_path):
    """The partitioned optimizer state (frozen group, masked decay) checkpoints and resumes exactly;
    a checkpoint whose state tree differs (here: written without freezing) is a clear error."""
    data = _data()
    run = lambda w, **kw: T.fit(CFG, TCFG, data, num_steps=10, workdir=str(w), steps_per_call=5,
                                checkpoint_every=5, progress=False, **kw)
    full = run(tmp_path / "full")
    run(tmp_path / "killed", stop_after=5)
    resumed = run(tmp_path / "killed")
    for x, y in zip(jax.tree.leaves((full.params, full.opt_state)), jax.tree.leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(x, y)
    plain = T.TrainConfig(batch_size=8, warmup_steps=50)
    T.fit(CFG, plain, data, num_steps=5, workdir=str(tmp_path / "other"), steps_per_call=5, progress=False)
    with pytest.raises(ValueError, match="does not fit the TrainState"):
        run(tmp_path / "other")
