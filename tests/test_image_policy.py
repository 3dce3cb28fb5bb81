"""Image policies: camera-image observations run through the observation encoder once per inference, and the
denoiser, every solver and warm start run on its condition unchanged (tiny encoder: width 8, 3x24x24 images)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_solvers import EXACT_SOLVERS, SAMPLERS, _ids
from test_vision import SMALL, randomize

from policy_accel.control import FakeClock, RealTimeController, SessionPlanner
from policy_accel.errors import CheckpointError, ObservationError
from policy_accel.experiment.episodes import EpisodeResult, RolloutOutcome, run_episodes
from policy_accel.io.checkpoint import load_policy, save_policy
from policy_accel.model.engine import EXACT_TOLERANCE
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.unet import UNetConfig
from policy_accel.model.vision import EncoderConfig, ObservationEncoder
from policy_accel.observations import ObservationHistory
from policy_accel.policy import DiffusionPolicy, PolicyConfig, build_denoiser
from policy_accel.schedule import ScheduleConfig
from policy_accel.session import Session
from policy_accel.solvers import make_solver

ACT, TO, H = 2, 2, 16
SHAPE = (3, 24, 24)
# DP image's encoder (its average-pooled features depend on the image even at 24x24, where a spatial softmax sees a
# 1x1 map); two cameras given unsorted (DP sorts them), a crop and DP's ImageNet step inside the encoder.
TINY = EncoderConfig(
    kind="dp_image",
    cameras={"wrist": SHAPE, "image": SHAPE},
    low_dim={"agent_pos": 2},
    crop_shape=(20, 20),
    imagenet_norm=True,
    width=8,
    norm="batch",
    feature_dim=64,
)
# tests/test_solvers.py's exact cases of ParaDiGMS at tau = 1e-3 (as the DP-T and inpainting policy tests: at its
# default 0.01 this policy's DDIM-16 batch-1 solve ends 1.0009e-3 off), ParaTAA and Newton (default: Broyden)
IMAGE_SOLVERS = [
    c for c in EXACT_SOLVERS if c[1] in ({"tolerance": 1e-3}, {"jacobian": "broyden"}) or c[0] == "parataa"
]


def image_policy(kind: str = "ddim", steps: int = 16, encoder: EncoderConfig = TINY) -> DiffusionPolicy:
    torch.manual_seed(0)
    unet = UNetConfig(
        input_dim=ACT,
        global_cond_dim=TO * encoder.step_feature_dim(),
        down_dims=[16, 32, 64],
        diffusion_step_embed_dim=32,
    )
    config = PolicyConfig(
        obs_dim=encoder.low_dim_total,
        action_dim=ACT,
        horizon=H,
        n_obs_steps=TO,
        unet=unet,
        encoder=encoder,
        schedule=ScheduleConfig(kind=kind, num_inference_steps=steps),
    )
    g = torch.Generator().manual_seed(1)
    return DiffusionPolicy(
        config,
        build_denoiser(config),
        LinearNormalizer.fit(torch.rand(50, encoder.low_dim_total, generator=g) * 512),
        LinearNormalizer.fit(torch.rand(50, ACT, generator=g) * 512),
        randomize(ObservationEncoder(encoder), seed=2),
    )


def observations(lead: tuple[int, ...], seed: int = 0, encoder: EncoderConfig = TINY) -> dict[str, np.ndarray]:
    """Observations with leading axes ``lead``: float32 CHW images in [0, 1] (DP's envs) and raw low-dim values."""
    rng = np.random.default_rng(seed)
    obs = {name: rng.random((*lead, *shape), dtype=np.float32) for name, shape in encoder.cameras}
    obs.update({name: rng.uniform(0, 512, (*lead, dim)) for name, dim in encoder.low_dim})
    return obs


@pytest.fixture(scope="module")
def policy() -> DiffusionPolicy:
    return image_policy()


class EncoderCalls:
    """Counts the encoder's forward passes (a forward hook)."""

    def __init__(self, policy: DiffusionPolicy):
        self.n = 0
        self._handle = policy.encoder.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.n += 1

    def __enter__(self) -> EncoderCalls:
        return self

    def __exit__(self, *_) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# The condition
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_the_condition_is_the_encoders_features_of_the_normalized_observation(policy, batch):
    obs = observations((batch, TO))
    with EncoderCalls(policy) as calls:
        cond = policy.condition(obs)
    assert calls.n == 1 and cond.shape == (batch, policy.config.cond_dim) == (batch, TO * (2 * 64 + 2))
    images = {name: torch.from_numpy(obs[name]) * 2 - 1 for name in ("image", "wrist")}  # DP's range normaliser
    low = policy.obs_normalizer.normalize(torch.from_numpy(obs["agent_pos"]).float())
    with torch.inference_mode():
        expected = policy.encoder(images, low)
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-6)
    # DP image's per-step order: sorted cameras, then the low-dim keys (normalized); steps one after the other
    per_step = cond.reshape(batch, TO, -1)
    torch.testing.assert_close(per_step[..., -2:], low, rtol=0, atol=1e-6)
    assert not torch.allclose(per_step[:, 0], per_step[:, 1])  # the two steps' images differ


def test_the_encoder_runs_once_per_inference_whatever_the_solver(policy):
    schedule = policy.schedule()
    obs = observations((2, TO))
    for name in ("sequential", "paradigms", "parataa", "newton"):
        session = Session(policy, make_solver(name), schedule, warm_start=name == "newton", check_exactness=True)
        with EncoderCalls(policy) as calls:
            session.plan(obs)
            session.plan(observations((2, TO), seed=1))
        assert calls.n == 2, name


def test_each_inference_records_the_encoders_time_inside_its_latency(policy):
    """The encoder made 30 ms slower shows as >= 30 ms of condition time per inference, inside the latency, and in
    the rollout summary (reports show the encoder's share from it)."""
    handle = policy.encoder.register_forward_hook(lambda *_: time.sleep(0.03))
    try:
        session = Session(policy, make_solver("sequential"), policy.schedule(kind="ddim", num_inference_steps=2))
        plans = [session.plan(observations((2, TO), seed=s)) for s in range(2)]
    finally:
        handle.remove()
    for plan in plans:
        assert 0.03 <= plan.record.condition_s <= plan.record.latency_s
    episode = EpisodeResult(seed=0, max_reward=0.5, success=False, steps=1, inferences=2)
    summary = RolloutOutcome([episode], [p.record for p in plans]).summary()
    assert summary["condition_ms"]["p50"] >= 30 and summary["condition_ms"]["p50"] <= summary["latency_ms"]["p50"]
    unslowed = session.plan(observations((2, TO), seed=3)).record
    assert unslowed.condition_s < 0.03 and unslowed.condition_s > 0


# ---------------------------------------------------------------------------------------------------------------
# Bad observations: one line naming the camera or key, on every entry path
# ---------------------------------------------------------------------------------------------------------------


def _drop(key):
    return lambda obs: {k: v for k, v in obs.items() if k != key}


def _set(key, change):
    return lambda obs: {**obs, key: change(obs[key])}


def _with_value(value):
    def change(x):
        x = x.copy()
        x.flat[0] = value
        return x

    return change


BAD = [
    ("missing camera", _drop("wrist"), "wrist", "no camera 'wrist'"),
    ("missing low-dim key", _drop("agent_pos"), "agent_pos", "no low-dim key 'agent_pos'"),
    ("unexpected key", lambda obs: {**obs, "depth": obs["image"]}, "depth", "unexpected key 'depth'"),
    ("channels last", _set("image", lambda x: np.moveaxis(x, -3, -1)), "image", r"has shape .*3\)"),
    ("uint8", _set("image", lambda x: (x * 255).astype(np.uint8)), "image", "dtype uint8"),
    ("bool", _set("wrist", lambda x: x > 0.5), "wrist", "dtype bool"),
    ("complex", _set("image", lambda x: x.astype(np.complex64)), "image", "dtype complex64"),
    ("str", _set("agent_pos", lambda x: x.astype(str)), "agent_pos", "dtype <U"),
    ("above 1", _set("image", _with_value(1.5)), "image", r"values in \[.*, 1.5\]"),
    ("below 0", _set("wrist", _with_value(-0.25)), "wrist", r"values in \[-0.25, .*\]"),
    ("0-255 floats", _set("image", lambda x: x * 255), "image", r"values in .*in \[0, 1\]"),
    ("NaN image", _set("image", _with_value(np.nan)), "image", "not finite"),
    ("inf low-dim", _set("agent_pos", _with_value(np.inf)), "agent_pos", "not finite"),
    ("low-dim size", _set("agent_pos", lambda x: x[..., :1]), "agent_pos", "has shape"),
    ("not a dict", lambda obs: obs["agent_pos"], None, "expected a dict with keys"),
]


@pytest.mark.parametrize("change,key,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_observations_give_one_line_naming_the_key_on_every_entry_path(policy, change, key, match):
    session = Session(policy, make_solver("sequential"), policy.schedule(kind="ddim", num_inference_steps=1))
    history = ObservationHistory(TO, layout=policy.config.encoder)
    for call, lead in ((policy.condition, (2, TO)), (session.plan, (2, TO)), (session.select_action, (2,))):
        with pytest.raises(ObservationError, match=match) as err:
            call(change(observations(lead)))
        assert (key is None or f"'{key}'" in str(err.value)) and "\n" not in str(err.value)
    with pytest.raises(ObservationError, match=match):
        history.push(change(observations(())))


def test_keys_of_different_batch_sizes_are_refused(policy):
    obs = observations((3, TO))
    obs["agent_pos"] = obs["agent_pos"][:2]
    with pytest.raises(ObservationError, match=r"batch sizes .* differ: .*'agent_pos': 2"):
        policy.condition(obs)


def test_torch_tensors_and_float64_images_are_observations_too(policy):
    obs = observations((2, TO))
    expected = policy.condition(obs)
    as_tensors = {k: torch.from_numpy(v) for k, v in obs.items()}
    as_float64 = {**obs, "image": obs["image"].astype(np.float64)}
    for other in (as_tensors, as_float64):
        torch.testing.assert_close(policy.condition(other), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Histories, sessions, episode loop and controller pass dicts through
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [TINY, None], ids=["layout", "first-sets-keys"])
def test_a_dict_history_pads_with_the_first_observation_and_keeps_copies(layout):
    h = ObservationHistory(3, layout=layout)
    first, second = observations((), seed=0), observations((), seed=1)
    h.push(first)
    stacked = h.stacked()
    assert list(stacked) == ["wrist", "image", "agent_pos"]
    for key, value in first.items():
        assert stacked[key].shape == (3, *value.shape)
        np.testing.assert_array_equal(stacked[key], np.stack([value] * 3))  # DP's padding: the first, repeated
    first["image"][:] = 0.0  # the caller reuses its buffer: the history holds its own copy
    h.push(second)
    stacked = h.stacked()
    assert stacked["image"][:2].min() > 0 and np.array_equal(stacked["image"][2], second["image"])
    assert h.latest["agent_pos"] is not second["agent_pos"]
    np.testing.assert_array_equal(h.latest["agent_pos"], second["agent_pos"])
    with pytest.raises(ObservationError, match="image"):
        h.push({**second, "image": second["image"][:, :10]})
    with pytest.raises(ObservationError, match="keys|no camera"):
        h.push({"image": second["image"]})
    with pytest.raises(ObservationError, match="array|dict"):
        h.push(np.zeros(2))
    h.clear()
    h.push(second)
    np.testing.assert_array_equal(h.stacked()["agent_pos"], np.stack([second["agent_pos"]] * 3))


def test_a_history_takes_a_size_or_a_layout_not_both():
    with pytest.raises(ValueError, match="not both"):
        ObservationHistory(2, 2, TINY)


@pytest.mark.parametrize("batch", [1, 3])
def test_select_action_takes_a_dict_of_images_and_state(policy, batch):
    """select_action on a dict equals planning on the padded history by hand; one encoder pass per chunk."""
    schedule = policy.schedule(kind="ddim", num_inference_steps=4)
    steps = [observations((batch,), seed=s) for s in range(policy.config.n_action_steps + 1)]

    def session():
        s = Session(policy, make_solver("newton"), schedule, warm_start=True, noise="coupled")
        s.reset(seed=3)
        return s

    one_at_a_time = session()
    with EncoderCalls(policy) as calls:
        got = [one_at_a_time.select_action(obs) for obs in steps]
    assert calls.n == 2  # a chunk at the first step and one after n_action_steps
    assert all(action.shape == (batch, ACT) for action in got)
    padded = {key: np.stack([value, value], axis=1) for key, value in steps[0].items()}
    expected = session().plan(padded).actions
    np.testing.assert_array_equal(np.stack(got[:-1], axis=1), expected)
    with pytest.raises(ObservationError, match="rows"):
        one_at_a_time.select_action(observations((batch + 1,)))


def test_the_episode_loop_and_the_controller_feed_dict_observations(policy):
    class Env:
        def __init__(self):
            self.t = 0

        def reset(self, seed=None):
            return observations((), seed=seed), {}

        def step(self, action):
            self.t += 1
            return observations((), seed=self.t), 0.5, False, self.t >= 3, {}

        def close(self):
            pass

    schedule = policy.schedule(kind="ddim", num_inference_steps=2)
    session = Session(policy, make_solver("sequential"), schedule)
    outcome = run_episodes(Env, session, [0, 1], env_batch=2, progress=False)
    assert [e.steps for e in outcome.episodes] == [3, 3] and len(outcome.records) == 1
    clock = FakeClock()
    with RealTimeController(SessionPlanner(session), 0.1, TO, clock=clock, lead_s=0.3) as ctrl:
        t0 = ctrl.start_episode(observations(()), seed=0)
        clock.sleep_until(t0 + 0.1)
        ctrl.observe(observations((), seed=1), t0 + 0.1)
        assert ctrl.act(t0 + 0.1).action.shape == (ACT,)
        with pytest.raises(ObservationError, match="keys"):
            ctrl.observe({"image": observations(())["image"]}, t0 + 0.2)


# ---------------------------------------------------------------------------------------------------------------
# Engines: OpenVINO serves the encoder too
# ---------------------------------------------------------------------------------------------------------------


GROUP_NORM = EncoderConfig(**dict(SMALL["robomimic"], width=16, norm="group"))


@pytest.mark.parametrize(
    "encoder", [TINY, GROUP_NORM, *(EncoderConfig(**SMALL[k]) for k in SMALL)], ids=["tiny", "group_norm", *SMALL]
)
def test_openvino_serves_the_encoder_of_every_kind_exactly(encoder):
    policy = image_policy(encoder=encoder)
    schedule = policy.schedule(kind="ddim", num_inference_steps=2)
    for batch in (1, 3):
        obs = observations((batch, TO), seed=batch, encoder=encoder)
        noise = policy.draw_noise(schedule, batch, torch.Generator().manual_seed(0))
        policy.use_engine("torch")
        eager_cond = policy.condition(obs)
        eager = make_solver("sequential").solve(policy.denoiser, schedule, noise, eager_cond).sample
        policy.use_engine("openvino", threads=1)
        assert policy.engine.encoder == "openvino" and policy.engine.to_dict()["encoder"] == "openvino"
        assert not policy.encoder.training  # exporting left the module in evaluation mode (center crop)
        cond = policy.condition(obs)
        assert cond.shape == eager_cond.shape and (cond - eager_cond).abs().max() <= EXACT_TOLERANCE
        served = make_solver("sequential").solve(policy.denoiser, schedule, noise, cond).sample
        assert (served - eager).abs().max() <= 1e-4  # two calls of the engine's 1e-5 apart, through the sampler


def test_an_encoder_edited_in_place_is_recompiled_before_the_next_inference():
    policy = image_policy().use_engine("openvino", threads=1)
    obs = observations((1, TO), seed=5)
    before = policy.condition(obs)
    with torch.no_grad():
        next(policy.encoder.parameters()).mul_(1.5)
    policy.sync_engine()  # what Session.plan does first
    after = policy.condition(obs)
    policy.use_engine("torch")
    eager = policy.condition(obs)
    assert (after - before).abs().max() > 1e-3 and (after - eager).abs().max() <= EXACT_TOLERANCE


def test_the_eager_engine_names_its_encoder():
    assert image_policy().use_engine("torch").engine.encoder == "torch"
    lowdim = load_policy(Path(__file__).resolve().parents[1] / "checkpoints" / "pusht", engine="torch")
    assert lowdim.engine.encoder == "none"


# ---------------------------------------------------------------------------------------------------------------
# Exactness: the solvers on the encoder's condition
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", IMAGE_SOLVERS, ids=_ids)
@pytest.mark.parametrize("kind,steps", SAMPLERS)
@pytest.mark.parametrize("batch", [1, 3])
def test_every_solver_returns_the_sequential_sample_on_the_image_policy(case, kind, steps, batch):
    name, options, atol = case
    policy = image_policy(kind, steps)
    schedule = policy.schedule()
    cond = policy.condition(observations((batch, TO), seed=batch))
    noise = policy.draw_noise(schedule, batch, torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = make_solver("sequential").solve(policy.denoiser, schedule, noise, cond)
        result = make_solver(name, **options).solve(policy.denoiser, schedule, noise, cond)
    assert result.converged and 1 <= result.iterations <= steps
    assert result.sample.shape == (batch, H, ACT)
    assert (result.sample - reference.sample).abs().max() <= atol


@pytest.mark.parametrize("kind,steps", SAMPLERS)
@pytest.mark.parametrize("batch", [1, 2])
def test_warm_newton_returns_the_sequential_sample_on_the_image_policy(kind, steps, batch):
    policy = image_policy(kind, steps)
    schedule = policy.schedule()
    session = Session(policy, make_solver("newton"), schedule, warm_start=True, noise="coupled", seed=0)
    assert not session.approximate
    _, _, cold = session.plan(observations((batch, TO), seed=0))
    later = observations((batch, TO), seed=1)
    _, warm, record = session.plan(later)
    assert not cold.warm and record.warm
    with torch.inference_mode():
        cond = policy.condition(later)
        reference = make_solver("sequential").solve(policy.denoiser, schedule, session._previous_noise, cond)
    assert warm.converged and (warm.sample - reference.sample).abs().max() <= 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Config and checkpoint format
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_the_encoder_bit_for_bit(policy, tmp_path):
    path = save_policy(policy, tmp_path / "ckpt")
    raw = json.loads((path / "config.json").read_text())
    assert raw["policy"]["encoder"]["cameras"] == {"wrist": [3, 24, 24], "image": [3, 24, 24]}
    loaded = load_policy(path, engine="torch")
    assert loaded.config == policy.config and not loaded.encoder.training
    for key, value in policy.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    obs = observations((2, TO))
    assert torch.equal(loaded.condition(obs), policy.condition(obs))
    solver, generator = make_solver("sequential"), torch.Generator
    expected, _ = policy.predict_action(obs, solver, generator=generator().manual_seed(5))
    actions, _ = loaded.predict_action(obs, solver, generator=generator().manual_seed(5))
    np.testing.assert_array_equal(actions, expected)
    actions, _ = loaded.use_engine().predict_action(obs, solver, generator=generator().manual_seed(5))
    assert loaded.engine.name != "torch"  # the compiled denoiser on the encoder's condition (1e-5 per call)
    np.testing.assert_allclose(actions, expected, rtol=0, atol=1e-2)  # raw units: the actions span ~512


@pytest.mark.parametrize("kind", list(SMALL))
def test_float16_storage_rounds_parameters_only_for_every_encoder_kind(kind, tmp_path):
    encoder = EncoderConfig(**SMALL[kind])
    policy = image_policy(encoder=encoder)
    small = save_policy(policy, tmp_path / "fp16", weights_dtype=torch.float16)
    full = save_policy(policy, tmp_path / "fp32")
    assert (small / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    loaded = load_policy(small, engine="torch")
    parameters = {name for name, _ in policy.encoder.named_parameters()}
    for key, value in policy.encoder.state_dict().items():
        got = loaded.encoder.state_dict()[key]
        assert got.dtype == value.dtype
        if key in parameters:
            torch.testing.assert_close(got, value, rtol=1e-3, atol=1e-4)
        else:  # BatchNorm statistics, keypoint grids, temperature: as they were
            assert torch.equal(got, value), key
    obs = observations((2, TO), encoder=encoder)
    torch.testing.assert_close(loaded.condition(obs), policy.condition(obs), rtol=1e-2, atol=1e-2)


def test_convert_fp16_verifies_and_keeps_the_encoder(policy, tmp_path, capsys):
    from test_formats import _convert_module

    src = save_policy(policy, tmp_path / "src")
    assert _convert_module().main([str(src), str(tmp_path / "dst"), "--fp16"]) == 0  # read back and verified
    assert "encoder: dp_image, cameras {'wrist': (3, 24, 24), 'image': (3, 24, 24)}" in capsys.readouterr().out
    loaded = load_policy(tmp_path / "dst", engine="torch")
    obs = observations((2, TO))
    torch.testing.assert_close(loaded.condition(obs), policy.condition(obs), rtol=1e-2, atol=1e-2)


def test_a_checkpoint_without_its_encoder_tensors_or_with_a_bad_section_is_refused(policy, tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_policy(policy, tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "encoder.cores.0.backbone.0.weight"}, str(path / "x"))
    (path / "x").replace(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing encoder \['cores.0.backbone.0.weight'\]"):
        load_policy(path)
    config = json.loads((path / "config.json").read_text())
    config["policy"]["encoder"]["width"] = 8.5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="invalid policy config: encoder.width: must be a positive integer"):
        load_policy(path)
    config["policy"]["encoder"] = None
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unet.global_cond_dim=260 != obs_dim"):
        load_policy(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"encoder": {"width": 0}}, "encoder.width: must be a positive integer"),
        ({"encoder": {"colour": True}}, "encoder.colour: unknown field"),
        ({"encoder": 3}, "encoder must be a mapping"),
        ({"obs_dim": 3}, r"obs_dim=3 != the encoder's low-dim total 2 \({'agent_pos': 2}\)"),
        ({"unet": {"global_cond_dim": 200}}, "global_cond_dim=200 != encoder features per step\\*n_obs_steps = 260"),
        ({"inpainting": True}, "inpainting=true is not supported with an image encoder"),
    ],
)
def test_inconsistent_image_policy_configs_are_refused_in_one_line(policy, change, message):
    config = policy.config.to_dict()
    for name, value in change.items():
        config[name] = {**config[name], **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message) as err:
        PolicyConfig(**config)
    assert "\n" not in str(err.value)


def test_the_encoder_module_must_match_the_config(policy):
    other = EncoderConfig(**{**TINY.to_dict(), "crop_shape": [18, 18]})
    with pytest.raises(ValueError, match="encoder"):
        DiffusionPolicy(policy.config, policy.model, policy.obs_normalizer, policy.action_normalizer)
    with pytest.raises(ValueError, match="encoder"):
        DiffusionPolicy(
            policy.config, policy.model, policy.obs_normalizer, policy.action_normalizer, ObservationEncoder(other)
        )


# ---------------------------------------------------------------------------------------------------------------
# The committed image checkpoint (checkpoints/pusht_image, trained here): exact on rendered PushT observations
# ---------------------------------------------------------------------------------------------------------------

IMAGE_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "pusht_image"


@pytest.fixture(scope="module")
def trained_image_policy() -> DiffusionPolicy:
    return load_policy(IMAGE_CHECKPOINT, engine="openvino")


def rendered_histories(batch: int) -> dict[str, np.ndarray]:
    """Each seed's first two image PushT observations (a reset and one step), stacked as (batch, 2, ...)."""
    from policy_accel.experiment.tasks import env_factory

    env = env_factory("pusht_image")(max_episode_steps=5, render_offscreen=False)
    rows = []
    for seed in range(100000, 100000 + batch):
        first, _ = env.reset(seed=seed)
        second = env.step(np.array([256.0, 256.0]))[0]
        rows.append({k: np.stack([first[k], second[k]]) for k in first})
    env.close()
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
@pytest.mark.parametrize("batch", [1, 2])
def test_the_committed_image_checkpoint_is_solved_exactly(trained_image_policy, kind, steps, batch):
    policy = trained_image_policy
    assert policy.config.encoder.kind == "robomimic" and policy.engine.encoder == "openvino"
    schedule = policy.schedule(kind=kind, num_inference_steps=steps)
    cond = policy.condition(rendered_histories(batch))
    noise = policy.draw_noise(schedule, batch, torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        reference = make_solver("sequential").solve(policy.denoiser, schedule, noise, cond).sample
        for name, options in (("paradigms", {}), ("newton", {"jacobian": "broyden"})):
            result = make_solver(name, **options).solve(policy.denoiser, schedule, noise, cond)
            assert result.converged and result.iterations < steps, name
            assert (result.sample - reference).abs().max() <= 1e-3, name
