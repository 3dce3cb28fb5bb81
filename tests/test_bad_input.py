"""Bad input and faults (issue #27): one clear error each, nothing runs that the user refused, no result lost.

Function-level checks are grouped; subprocess tests run the real command line only where the command line is
what is tested (one stderr line, exit status, Hydra's parsing of ``no``), on one short episode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_errors import default_sigint, one_error_line

from policy_accel.errors import PickleRefusedError
from policy_accel.io.checkpoint import load_policy

ROOT = Path(__file__).resolve().parents[1]
PUSHT = ROOT / "checkpoints" / "pusht"
FAST = ["threads=1", "solver=sequential", "policy=ddim2", "seeds=[100000]", "task.max_episode_steps=16"]


def run_script(script: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "eval" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# -- pickles: only an explicit boolean true opens one -------------------------------------------------------------


class _SideEffect:
    """Unpickling this creates ``marker``: what a hostile .ckpt could do with any callable."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def hostile_ckpt(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.ckpt"
    torch.save({"cfg": {}, "state_dicts": {}, "x": _SideEffect(marker)}, path)
    return path, marker


@pytest.mark.parametrize("trust", ["no", "false", "False", "0", "", "true", "yes", 1, 0, None, [True]])
def test_load_policy_opens_a_pickle_only_for_the_boolean_true(trust, hostile_ckpt):
    path, marker = hostile_ckpt
    with pytest.raises(ValueError, match=r"trust_pickle=.* is not a boolean"):
        load_policy(path, trust_pickle=trust)
    assert not marker.exists()
    with pytest.raises(PickleRefusedError, match="run arbitrary code"):
        load_policy(path, trust_pickle=False)
    assert not marker.exists()
    with pytest.raises(Exception, match="state_dicts has no policy weights"):
        load_policy(path, trust_pickle=True)  # the test can see an unpickling: true does open it
    assert marker.exists()


@pytest.mark.parametrize("spelling", ["no", "'false'", "off", "0"])
def test_rollout_trust_pickle_spelled_as_no_never_unpickles(spelling, hostile_ckpt):
    path, marker = hostile_ckpt
    run = run_script("rollout.py", *FAST, f"checkpoint={path}", f"trust_pickle={spelling}", "out_dir=/tmp/x")
    line = one_error_line(run)
    assert "trust_pickle=" in line and "true or false" in line
    assert not marker.exists()


def test_convert_refuses_a_pickle_without_the_flag_and_never_opens_it(hostile_ckpt, tmp_path):
    path, marker = hostile_ckpt
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "convert.py"), str(path), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "--trust-pickle" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()


def _copy_pusht(tmp_path: Path) -> Path:
    dst = tmp_path / "my_policy"
    shutil.copytree(PUSHT, dst)
    return dst


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


# -- non-finite numbers: refused at load and on input, never reported as success -------------------------------------


@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    """A small random PushT-shaped policy in our format."""
    from policy_accel.io.checkpoint import save_policy
    from policy_accel.model.normalizer import LinearNormalizer
    from policy_accel.model.unet import ConditionalUnet1D, UNetConfig
    from policy_accel.policy import DiffusionPolicy, PolicyConfig

    torch.manual_seed(0)
    config = PolicyConfig(unet=UNetConfig(down_dims=[16, 32, 64], diffusion_step_embed_dim=32))
    obs = LinearNormalizer.fit(torch.rand(100, 18) * 512)
    act = LinearNormalizer.fit(torch.rand(100, 2) * 512)
    return save_policy(DiffusionPolicy(config, ConditionalUnet1D(config.unet), obs, act), tmp_path / "small")


def _poke(path: Path, key: str, value: float, index: int = 0) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    tensors[key].view(-1)[index] = value
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("model.final_conv.1.weight", float("nan"), "tensor final_conv.1.weight has 1 non-finite"),
        ("model.mid_modules.0.blocks.0.block.0.bias", float("inf"), "non-finite"),
        ("normalizer.obs.scale", float("nan"), "tensor normalizer.obs.scale has 1 non-finite"),
        ("normalizer.action.offset", float("-inf"), "tensor normalizer.action.offset"),
        ("normalizer.action.scale", 0.0, "normalizer.action.scale is zero at dims [0]"),
    ],
)
def test_non_finite_weights_and_normalizers_are_refused_at_load_naming_file_and_tensor(key, value, words, small_ckpt):
    from policy_accel.errors import CheckpointError

    _poke(small_ckpt, key, value)
    with pytest.raises(CheckpointError) as err:
        load_policy(small_ckpt)
    assert str(small_ckpt / "model.safetensors") in str(err.value) and words in str(err.value)


def test_observations_are_checked_as_the_network_sees_them(trained_policy):
    import numpy as np

    from policy_accel.errors import ObservationError
    from policy_accel.session import Session
    from policy_accel.solvers import make_solver

    session = Session(
        trained_policy, make_solver("sequential"), trained_policy.schedule(kind="ddim", num_inference_steps=2)
    )
    good = np.full((1, 2, 18), 100.0)
    for value, where in (
        (1e300, "as float32"),
        (np.nan, "as float32"),
        (-np.inf, "as float32"),
        (3e38, "normalized observation reaches"),
    ):
        obs = good.copy()
        obs[0, 1, 5] = value
        with pytest.raises(ObservationError, match=rf"{where}.*(\[batch 0, step 1, dim 5\]|units)"):
            session.plan(obs)
    for bad in (np.zeros((1, 3, 18)), np.zeros((0, 2, 18)), [["a"] * 18] * 2, np.zeros((2, 18))):
        with pytest.raises(ObservationError, match="observation history"):
            session.plan(bad)
    actions, _, _ = session.plan(good)  # and a good one still plans
    assert actions.shape == (1, 8, 2) and np.isfinite(actions).all()


def test_weights_broken_after_loading_are_blamed_not_the_solver(small_ckpt):
    import numpy as np

    from policy_accel.errors import CheckpointError
    from policy_accel.session import Session
    from policy_accel.solvers import make_solver

    policy = load_policy(small_ckpt)
    with torch.no_grad():
        next(policy.model.parameters()).fill_(float("nan"))
    session = Session(policy, make_solver("sequential"), policy.schedule(kind="ddim", num_inference_steps=2))
    with pytest.raises(CheckpointError, match="weights are not finite, not the solver"):
        session.plan(np.full((1, 2, 18), 100.0))


def test_rollout_of_a_checkpoint_with_a_nan_weight_fails_naming_file_and_tensor(tmp_path):
    ckpt = _copy_pusht(tmp_path)
    _poke(ckpt, "model.final_conv.1.weight", float("nan"), index=3)
    run = run_script("rollout.py", *FAST, f"checkpoint={ckpt}", f"out_dir={tmp_path / 'out'}")
    line = one_error_line(run)
    assert str(ckpt / "model.safetensors") in line and "final_conv.1.weight" in line
    assert not (tmp_path / "out" / "results.json").exists()


# -- checkpoint configs that load but cannot work -------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda c: c["policy"].update(n_action_steps=0), "n_action_steps=0 must be >= 1"),
        (lambda c: c["policy"].update(n_action_steps=-3), "n_action_steps=-3 must be >= 1"),
        (lambda c: c["policy"].update(horizon="16"), "horizon='16' is not allowed: expected an integer"),
        (lambda c: c["policy"].update(obs_dim=18.0), "obs_dim=18.0 is not allowed: expected an integer"),
        (lambda c: c["policy"].update(n_obs_steps=True), "n_obs_steps=True is not allowed: expected an integer"),
        (
            lambda c: c["policy"]["schedule"].update(clip_sample="no"),
            "schedule.clip_sample='no' is not allowed: expected true or false",
        ),
        (lambda c: c["policy"]["schedule"].update(beta_end=float("nan")), "schedule.beta_end=nan"),
        (lambda c: c["policy"]["schedule"].update(num_inference_steps="10"), "num_inference_steps='10'"),
        (lambda c: c["policy"]["schedule"].update(beta_start=0.5), "need 0 < beta_start < beta_end < 1"),
        (lambda c: c["policy"]["unet"].update(down_dims=[16, "32", 64]), "unet.down_dims="),
        (lambda c: c["policy"]["unet"].update(kernel_size=4), "unet.kernel_size=4 must be odd"),
        (lambda c: c["policy"]["unet"].update(n_groups=0), "unet.n_groups=0 must be >= 1"),
        (lambda c: c["policy"]["unet"].update(extra=1), "unet.extra=1 is not allowed: not an option"),
        (lambda c: c["policy"].update(schedule=[]), "schedule must be a mapping"),
        (lambda c: c.update(version=2), "format version 2 is not one this toolkit reads"),
        (lambda c: c.update(version="1"), "format version '1'"),
        (lambda c: c.update(policy="pusht"), "'policy' is a str, expected an object"),
    ],
)
def test_checkpoint_config_fields_are_checked_for_type_and_range_when_read(edit, words, small_ckpt):
    from policy_accel.errors import CheckpointError

    _edit_config(small_ckpt, edit)
    with pytest.raises(CheckpointError) as err:
        load_policy(small_ckpt)
    assert str(small_ckpt / "config.json") in str(err.value) and words in str(err.value), str(err.value)


# -- the real-time loop runs the user's policy with every rollout option ---------------------------------------------


def test_realtime_and_rollout_both_run_the_checkpoint_given_by_path_with_its_options(tmp_path):
    ckpt = _copy_pusht(tmp_path)
    opts = [
        f"checkpoint={ckpt}",
        "warm_start=renoise",
        "renoise_steps=1",
        "tail_fill=chain",
        "budget.max_iterations=2",
    ]
    offline = run_script("rollout.py", *FAST, *opts, f"out_dir={tmp_path / 'offline'}")
    assert offline.returncode == 0, offline.stderr[-3000:]
    online = run_script("realtime.py", *FAST[:4], "max_steps=16", *opts, f"out_dir={tmp_path / 'online'}")
    assert online.returncode == 0, online.stderr[-3000:]
    a = json.loads((tmp_path / "offline" / "results.json").read_text())
    b = json.loads((tmp_path / "online" / "results.json").read_text())
    for r in (a, b):
        assert r["checkpoint"] == str(ckpt) and r["warm_start"] == "renoise" and r["renoise_steps"] == 1
        assert r["tail_fill"] == "chain" and r["approximate"] is True

    _poke(ckpt, "model.final_conv.1.weight", float("nan"))  # the file is what both load: both refuse it now
    for script in ("rollout.py", "realtime.py"):
        line = one_error_line(run_script(script, *FAST[:4], f"checkpoint={ckpt}", f"out_dir={tmp_path / 'x'}"))
        assert str(ckpt / "model.safetensors") in line and "final_conv.1.weight" in line


def test_realtime_refuses_a_missing_policy_path_and_a_pickle_spelled_no(hostile_ckpt, tmp_path):
    line = one_error_line(run_script("realtime.py", "checkpoint=/nonexistent", f"out_dir={tmp_path}"))
    assert "checkpoint directory /nonexistent does not exist" in line
    path, marker = hostile_ckpt
    line = one_error_line(run_script("realtime.py", f"checkpoint={path}", "trust_pickle=no", f"out_dir={tmp_path}"))
    assert "trust_pickle='no'" in line and not marker.exists()


@dataclasses.dataclass
class Stats:
    chunks: int = 1


def test_realtime_counts_a_tick_that_is_both_a_fallback_and_late_once():
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "eval"))
    from realtime import EpisodeLog, summarize

    cfg = _compose("realtime.yaml", ["rate_hz=1000", "offline_results=null", "out_dir=/tmp/unused"], hydra=False)
    ep = EpisodeLog(0, steps=3, misses=1, miss_ticks=[1], wake_s=[0.0, 0.0021, 0.003], late_s=[0.0, 0.0011, 0.0])
    ep.chunk_actions = {0: 2}
    from policy_accel.warm_starts import Cold

    session = SimpleNamespace(warm=Cold(), approximate=False)
    from policy_accel.model.engine import EngineInfo

    policy = SimpleNamespace(engine=EngineInfo("torch", "2", "f32", 1))
    setup = SimpleNamespace(warm_start=False, session=session, checkpoint="c", policy=policy)
    ctrl = SimpleNamespace(stats=Stats())
    out = summarize(cfg, setup, [ep], [], ctrl)
    assert out["fallback_ticks"] == 1 and out["overrun_ticks"] == 1 and out["missed_ticks"] == 1


# -- results lost or mixed --------------------------------------------------------------------------------------------


def _compose(config: str, overrides: list[str], hydra: bool = True):
    from hydra import compose, initialize_config_dir

    import policy_accel.experiment.build  # noqa: F401  (registers ${run_id:})

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config, overrides=overrides, return_hydra_config=hydra)


def test_default_run_directories_differ_whenever_a_result_setting_does():
    from omegaconf import OmegaConf

    def run_dir(config: str, *overrides: str) -> str:
        cfg = _compose(config, list(overrides))
        return OmegaConf.select(cfg, "hydra.run.dir")

    base = run_dir("rollout.yaml", "n_episodes=5")
    assert base == run_dir("rollout.yaml", "n_episodes=5", "skip_existing=true", "save_video=true")
    others = [
        run_dir("rollout.yaml", "n_episodes=6"),
        run_dir("rollout.yaml", "n_episodes=5", "start_seed=7"),
        run_dir("rollout.yaml", "n_episodes=5", "solver.options.tolerance=0.1"),
        run_dir("rollout.yaml", "n_episodes=5", "budget.max_iterations=3"),
        run_dir("rollout.yaml", "n_episodes=5", "check_exactness=true"),
        run_dir("rollout.yaml", "n_episodes=5", "checkpoint=/x"),
    ]
    assert len({base, *others}) == 7
    assert run_dir("realtime.yaml", "lead_ms=200") != run_dir("realtime.yaml", "lead_ms=100")


def test_a_different_run_never_overwrites_results_and_fails_before_its_first_episode(tmp_path):
    first = run_script("rollout.py", *FAST, f"out_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "results.json").read_text()
    for change in ("seeds=[100001]", "budget.max_iterations=1", "policy.schedule.kind=ddpm", "check_exactness=true"):
        for skip in ("skip_existing=false", "skip_existing=true"):
            run = run_script("rollout.py", *FAST, change, skip, f"out_dir={tmp_path}")
            line = one_error_line(run)
            assert "holds another run" in line and "seed 100001" not in run.stdout + run.stderr
    assert (tmp_path / "results.json").read_text() == before
    same = run_script("rollout.py", *FAST, "skip_existing=true", f"out_dir={tmp_path}")
    assert same.returncode == 0 and "skipped (skip_existing=true)" in same.stdout + same.stderr


def test_an_output_directory_that_cannot_be_written_fails_before_the_first_episode(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for script in ("rollout.py", "realtime.py"):
        run = run_script(script, *FAST[:4], f"out_dir={blocker / 'out'}")
        line = one_error_line(run)
        assert f"out_dir='{blocker / 'out'}' cannot be written" in line
        assert "seed 100000:" not in run.stdout + run.stderr  # no episode ran


def test_ctrl_c_keeps_finished_episodes_and_the_same_command_resumes(tmp_path):
    import signal
    import time

    seeds = "seeds=[100000,100001,100002,100003,100004,100005,100006,100007]"
    args = [sys.executable, str(ROOT / "eval" / "rollout.py"), *FAST[:3], seeds, f"out_dir={tmp_path}"]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    progress = tmp_path / "episodes.partial.json"
    deadline = time.monotonic() + 240
    while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert proc.returncode == 130 and "run the same command again to resume" in err, err[-3000:]
    kept = json.loads(progress.read_text())
    assert 1 <= len(kept["episodes"]) < 8 and not (tmp_path / "results.json").exists()

    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(kept['episodes'])} of 8 episodes" in resumed.stdout + resumed.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == list(range(100000, 100008))
    assert results["episodes"][: len(kept["episodes"])] == kept["episodes"] and not progress.exists()


# -- values of the wrong type or range: one line naming the key, the value and what is allowed ------------------------


@pytest.mark.parametrize(
    "config,override,words",
    [
        ("rollout.yaml", "n_episodes=abc", "n_episodes='abc' is not allowed: expected an integer >= 1"),
        ("rollout.yaml", "n_episodes=0", "n_episodes=0 is not allowed"),
        ("rollout.yaml", "seeds=abc", "seeds='abc' is not allowed: expected a non-empty list of integers"),
        ("rollout.yaml", "seeds=[]", "seeds=[] is not allowed"),
        ("rollout.yaml", "seeds=[1,1]", "expected distinct seeds"),
        ("rollout.yaml", "seeds=[1.5]", "seeds=[1.5]"),
        ("rollout.yaml", "start_seed=-1", "start_seed=-1"),
        ("rollout.yaml", "threads=0", "threads=0 is not allowed: expected an integer >= 1"),
        ("rollout.yaml", "threads=two", "threads='two'"),
        ("rollout.yaml", "budget.time_ms=0", "budget.time_ms=0 is not allowed: expected a finite number > 0"),
        ("rollout.yaml", "budget.time_ms=nan", "budget.time_ms=nan"),
        ("rollout.yaml", "budget.max_iterations=0", "budget.max_iterations=0"),
        ("rollout.yaml", "warm_start=yes", "warm_start='yes' is not allowed: expected false, true (exact) or renoise"),
        ("rollout.yaml", "warm_start=1", "warm_start=1"),
        ("rollout.yaml", "tail_fill=zero", "tail_fill='zero' is not allowed: expected one of repeat, chain"),
        ("rollout.yaml", "renoise_steps=0", "renoise_steps=0"),
        ("rollout.yaml", "renoise_steps=3", "renoise_steps=3 is only used with warm_start='renoise'"),
        ("rollout.yaml", "solver.noise=same", "solver.noise='same' is not allowed"),
        ("rollout.yaml", "device=gpu", "device='gpu' is not allowed"),
        ("rollout.yaml", "check_exactness=maybe", "check_exactness='maybe' is not allowed: expected true or false"),
        ("rollout.yaml", "trust_pickle=1", "trust_pickle=1 is not allowed: expected true or false"),
        ("rollout.yaml", "checkpoint=''", "checkpoint='' is not allowed"),
        (
            "rollout.yaml",
            "solver.options.tolerance=abc",
            "solver.options.tolerance='abc' is not allowed: expected a finite number > 0",
        ),
        ("rollout.yaml", "policy.schedule.num_inference_steps=1000", "policy.schedule="),
        ("rollout.yaml", "policy.schedule.kind=dpm", "policy.schedule="),
        ("realtime.yaml", "rate_hz=0", "rate_hz=0 is not allowed: expected a finite number > 0 <= 1000"),
        ("realtime.yaml", "rate_hz=1e9", "rate_hz=1000000000.0 is not allowed"),
        ("realtime.yaml", "rate_hz=fast", "rate_hz='fast'"),
        ("realtime.yaml", "obs_delay_ms=-1", "obs_delay_ms=-1"),
        ("realtime.yaml", "fallback=stop", "fallback='stop' is not allowed: expected one of hold, continue"),
        ("realtime.yaml", "chunk_steps=0", "chunk_steps=0"),
        ("realtime.yaml", "lead_ms=-5", "lead_ms=-5"),
        ("realtime.yaml", "latency_safety=0", "latency_safety=0"),
        ("realtime.yaml", "max_steps=0", "max_steps=0"),
        ("realtime.yaml", "switch_interval_ms=0", "switch_interval_ms=0"),
    ],
)
def test_run_values_of_the_wrong_type_or_range_name_key_value_and_what_is_allowed(config, override, words):
    from policy_accel.errors import ConfigError

    cfg = _compose(config, [override, "out_dir=/tmp/unused"], hydra=False)
    if config == "realtime.yaml":
        from policy_accel.experiment.realtime import build_realtime_session as build
    else:
        from policy_accel.experiment.build import build_session as build
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    line = one_error_line(run_script("rollout.py", "n_episodes=abc", f"out_dir={tmp_path}"))
    assert line == "error: n_episodes='abc' is not allowed: expected an integer >= 1"
    line = one_error_line(run_script("realtime.py", "rate_hz=0", f"out_dir={tmp_path}"))
    assert line.startswith("error: rate_hz=0 is not allowed")
    train = subprocess.run(
        [sys.executable, "-m", "policy_accel.train", "threads=0", f"out_dir={tmp_path / 'train'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one_error_line(train) == "error: threads=0 is not allowed: expected an integer >= 1"
    # in a sweep the failing job is reported without a traceback, and the exit status is still non-zero
    sweep = run_script("rollout.py", "-m", "threads=1", "n_episodes=abc", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode != 0 and "error: n_episodes='abc' is not allowed" in sweep.stderr
    assert "Traceback" not in sweep.stderr


def test_realtime_compares_with_the_offline_scores_of_its_own_task():
    """The offline score next to a real-time run comes from that task's benchmark, never another task's (an image
    PushT run was compared with the low-dim policy's 0.929)."""
    for task in ("pusht", "pusht_image", "lift"):
        cfg = _compose("realtime.yaml", [f"task={task}", "out_dir=/tmp/unused"], hydra=False)
        assert cfg.offline_results == f"reports/{task}_cpu/results.csv"
