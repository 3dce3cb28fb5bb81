"""Engines serve the same network: per call within 1e-5 of eager PyTorch, every solver still exact on them,
compiled once and cached, chosen by ``engine=auto`` and named in results."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch

from policy_accel.errors import ConfigError
from policy_accel.io.checkpoint import load_policy
from policy_accel.model.engine import (
    EXACT_TOLERANCE,
    STATIC_BATCHES,
    available,
    compile_denoiser,
    resolve_engine,
    split_rows,
    static_batch,
)
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.session import Session
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise

PUSHT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "pusht"

CPU_ENGINES = [e for e in ("openvino", "onnxruntime") if available(e)]


@pytest.fixture(scope="module", params=CPU_ENGINES)
def engine_policy(request):
    """The committed PushT policy served by each CPU engine (the eager module stays at ``policy.model``)."""
    return load_policy(PUSHT_CHECKPOINT, engine=request.param)


@pytest.fixture(scope="module", params=CPU_ENGINES)
def random_engine(request, random_net):
    served, info = compile_denoiser(random_net, request.param, sample_shape=(16, 2), cond_dim=36, threads=1)
    return served


def _inputs(batch: int, cond_dim: int = 36, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, 2, generator=g),
        torch.randint(0, 100, (batch,), generator=g),
        torch.randn(batch, cond_dim, generator=g),
    )


def test_auto_is_openvino_on_this_cpu():
    assert available("openvino"), "openvino is a regular dependency"
    assert resolve_engine("auto", "cpu") == "openvino"


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_a_call_matches_eager_on_the_trained_network(engine_policy, batch):
    x, t, c = _inputs(batch)
    with torch.inference_mode():
        eager = engine_policy.model(x, t, c)
        served = engine_policy.denoiser(x, t, c)
        scalar_t = engine_policy.denoiser(x, t[0], c)  # a scalar timestep, as some solvers pass it
        eager_scalar = engine_policy.model(x, t[0], c)
    assert served.shape == eager.shape and served.dtype == torch.float32
    assert (served - eager).abs().max() <= EXACT_TOLERANCE
    assert (scalar_t - eager_scalar).abs().max() <= EXACT_TOLERANCE


@pytest.mark.parametrize("batch", [1, 5])
def test_a_call_matches_eager_on_a_random_network(random_engine, random_net, batch):
    x, t, c = _inputs(batch, seed=1)
    with torch.inference_mode():
        assert (random_engine(x, t, c) - random_net(x, t, c)).abs().max() <= EXACT_TOLERANCE


def test_outputs_are_fresh_tensors_and_inputs_untouched(engine_policy):
    x, t, c = _inputs(2)
    keep = x.clone()
    first = engine_policy.denoiser(x, t, c)
    again = first.clone()
    engine_policy.denoiser(x * 2, t, c)  # a later call must not overwrite an earlier result
    assert torch.equal(first, again) and torch.equal(x, keep)


def test_non_contiguous_inputs_are_served(engine_policy):
    x, t, c = _inputs(4)
    view = x.transpose(1, 2).contiguous().transpose(1, 2)[::2]  # strided rows
    with torch.inference_mode():
        assert (
            engine_policy.denoiser(view, t[::2], c[::2]) - engine_policy.model(view, t[::2], c[::2])
        ).abs().max() <= (EXACT_TOLERANCE)


def test_calls_from_a_worker_thread(engine_policy):
    """The real-time controller plans in a worker thread: each thread gets its own request."""
    x, t, c = _inputs(1)
    expected = engine_policy.denoiser(x, t, c)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("y", engine_policy.denoiser(x, t, c)))
    worker.start()
    worker.join()
    assert torch.equal(out["y"], expected)


# (solver, options, sampler, steps, batch): DDPM and DDIM, batch 1 and > 1, each solver at least once
SOLVER_CASES = [
    ("paradigms", {}, "ddpm", 100, 1),
    ("parataa", {}, "ddim", 16, 3),
    ("newton", {"jacobian": "broyden"}, "ddpm", 100, 1),
    ("newton", {"jacobian": "broyden"}, "ddim", 16, 3),
    ("newton", {"jacobian": "exact", "derivatives": "forward_ad"}, "ddim", 16, 1),  # tangents run the eager module
]


@pytest.fixture(scope="module")
def openvino_policy():
    return load_policy(PUSHT_CHECKPOINT, engine="openvino")


@pytest.mark.parametrize("name,options,kind,steps,batch", SOLVER_CASES)
def test_every_solver_is_exact_on_the_engine(openvino_policy, name, options, kind, steps, batch):
    """The parallel solvers on the engine return the engine's sequential sample, and that is eager's to 1e-4."""
    schedule = Schedule(ScheduleConfig(kind=kind, num_inference_steps=steps))
    g = torch.Generator().manual_seed(7)
    noise = Noise.draw(steps, (batch, 16, 2), g)
    cond = torch.randn(batch, 36, generator=g).clamp(-1, 1)
    with torch.inference_mode():
        reference = make_solver("sequential").solve(openvino_policy.denoiser, schedule, noise, cond)
        eager = make_solver("sequential").solve(openvino_policy.model, schedule, noise, cond)
        result = make_solver(name, **options).solve(openvino_policy.denoiser, schedule, noise, cond)
    assert result.converged
    assert (result.sample - reference.sample).abs().max() <= 1e-3  # the solvers' stated bound
    assert (reference.sample - eager.sample).abs().max() <= 1e-4  # per-call error is not amplified by the chain


def test_the_disk_cache_serves_a_second_start_and_changes_with_the_weights(tmp_path, random_net):
    def compile_(net):
        return compile_denoiser(net, "openvino", sample_shape=(16, 2), cond_dim=36, threads=1, cache_dir=tmp_path)

    first, second = compile_(random_net), compile_(random_net)
    assert not first[1].cache_hit and second[1].cache_hit
    other = copy.deepcopy(random_net)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    served, info = compile_(other)
    assert not info.cache_hit  # other weights, another network: never served a stale one
    x, t, c = _inputs(1)
    with torch.inference_mode():
        assert (served(x, t, c) - other(x, t, c)).abs().max() <= EXACT_TOLERANCE
    networks = [p.name for p in tmp_path.iterdir() if not p.name.startswith("openvino-blobs")]
    assert len(networks) == 2 and all("." not in n for n in networks)  # one per network, no temporary leftovers


def test_bf16_is_labelled_approximate_and_f32_is_not(trained_policy):
    policy = load_policy(PUSHT_CHECKPOINT, engine="torch").use_engine("openvino", precision="bf16")
    assert policy.engine.approximate and policy.engine.to_dict()["precision"] == "bf16"
    session = Session(policy, make_solver("sequential"), policy.schedule(kind="ddim", num_inference_steps=2))
    assert session.approximate
    exact = load_policy(PUSHT_CHECKPOINT, engine="openvino")
    assert not Session(exact, make_solver("sequential"), exact.schedule()).approximate


@pytest.mark.parametrize(
    "engine,device,kwargs,match",
    [
        ("tensorrt", "cpu", {}, "engine='tensorrt' is not allowed"),
        ("cuda_graphs", "cpu", {}, "engine=cuda_graphs needs device=cuda"),
    ],
)
def test_bad_engines_are_refused_in_one_line(engine, device, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_engine(engine, device)


def test_bad_precision_and_threads_are_refused(random_net):
    with pytest.raises(ConfigError, match="engine_precision='fp8'"):
        compile_denoiser(random_net, "openvino", sample_shape=(16, 2), cond_dim=36, precision="fp8")
    with pytest.raises(ConfigError, match="offered by engine=openvino only"):
        compile_denoiser(random_net, "torch", sample_shape=(16, 2), cond_dim=36, precision="bf16")
    with pytest.raises(ConfigError, match="threads=0"):
        compile_denoiser(random_net, "openvino", sample_shape=(16, 2), cond_dim=36, threads=0)


def test_moving_the_policy_drops_the_engine():
    policy = load_policy(PUSHT_CHECKPOINT, engine="openvino")
    assert policy.engine.name == "openvino"
    policy.to("cpu")
    assert policy.engine.name == "torch" and policy._forward is policy.model


def test_rollout_runs_on_the_default_engine_and_names_it(run_rollout, tmp_path):
    run = run_rollout(
        "solver=sequential", "policy=ddim1", "n_episodes=1", "check_exactness=true", f"out_dir={tmp_path}"
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["engine"] == {"name": "openvino", "precision": "f32"}
    assert results["engine_info"]["version"] and results["approximate"] is False
    assert results["max_abs_dev"] <= 1e-3


def test_rollout_refuses_an_unknown_engine_in_one_line(run_rollout, tmp_path):
    run = run_rollout("engine=trt", "n_episodes=1", f"out_dir={tmp_path}")
    assert run.returncode == 1 and run.stderr.strip().startswith("error: engine='trt' is not allowed")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("kind,batch", [("ddim", 1), ("ddpm", 3)])
def test_a_fused_chain_is_the_call_by_call_chain(random_net, kind, batch, tmp_path):
    """The whole sequential chain as one program returns the call-by-call trajectory, and eager's within 1e-5."""
    served, info = compile_denoiser(
        random_net, "openvino", sample_shape=(16, 2), cond_dim=36, threads=1, fuse_chains=True
    )
    assert info.fused_chains
    schedule = Schedule(ScheduleConfig(kind=kind, num_inference_steps=4))
    assert served.chain(schedule) is None  # never compiled inside a solve
    program = served.chain(schedule, compile=True)
    assert program is not None and served.chain(schedule) is program
    g = torch.Generator().manual_seed(5)
    noise = Noise.draw(4, (batch, 16, 2), g)
    cond = torch.randn(batch, 36, generator=g)
    solver = make_solver("sequential")
    with torch.inference_mode():
        fused = solver.solve(served, schedule, noise, cond)
        served.fuse_chains = False
        per_call = solver.solve(served, schedule, noise, cond)
        served.fuse_chains = True
        eager = solver.solve(random_net, schedule, noise, cond)
    assert fused.converged and fused.iterations == 4 and fused.nfe == 4 * batch
    assert fused.trajectory.shape == per_call.trajectory.shape == (5, batch, 16, 2)
    assert (fused.trajectory - per_call.trajectory).abs().max() <= EXACT_TOLERANCE
    assert (fused.sample - eager.sample).abs().max() <= EXACT_TOLERANCE


def test_a_session_prepares_its_chains_before_the_first_inference(openvino_policy):
    schedule = openvino_policy.schedule(kind="ddim", num_inference_steps=3, timestep_spacing="trailing")
    Session(openvino_policy, make_solver("sequential"), schedule)
    assert openvino_policy.denoiser.chain(schedule, compile=True) is None  # fusing is an option, off by default
    fused = load_policy(PUSHT_CHECKPOINT, engine="torch").use_engine("openvino", fuse_chains=True)
    Session(fused, make_solver("sequential"), schedule, warm_start="renoise", renoise_steps=2)
    assert fused.denoiser.chain(schedule) is not None
    assert fused.denoiser.chain(schedule.tail(2)) is not None
    long_chain = fused.schedule()  # DDPM-100: too long for one program, solved call by call
    Session(fused, make_solver("sequential"), long_chain)
    assert fused.denoiser.chain(long_chain, compile=True) is None
    with pytest.raises(ConfigError, match="engine_fuse=True is not allowed"):
        load_policy(PUSHT_CHECKPOINT, engine="torch").use_engine("onnxruntime", fuse_chains=True)


def test_weights_edited_in_place_are_recompiled_before_the_next_inference():
    """An engine holds a copy of the weights: a session never plans with the old ones after an in-place edit."""
    import numpy as np

    obs = np.full((1, 2, 18), 100.0)

    def plan(policy):
        session = Session(policy, make_solver("sequential"), policy.schedule(kind="ddim", num_inference_steps=2))
        session.reset(seed=0)
        return session.plan(obs)[0]

    policy = load_policy(PUSHT_CHECKPOINT, engine="openvino")
    before = plan(policy)
    eager = load_policy(PUSHT_CHECKPOINT, engine="torch")
    with torch.no_grad():
        policy.model.final_conv[1].bias.add_(0.5)
        eager.model.final_conv[1].bias.add_(0.5)
    after = plan(policy)
    assert np.abs(after - before).max() > 1.0  # the edit reached the engine
    assert np.abs(after - plan(eager)).max() <= 1e-2  # raw units (up to 512): the engine runs the edited weights


def _openvino(model, **options):
    served, _ = compile_denoiser(model, "openvino", sample_shape=(16, 2), cond_dim=36, threads=1, **options)
    return served


@pytest.mark.parametrize("batch", [1, 5, 16, 17, 100])
def test_openvino_static_programs_serve_every_batch_size_padded_up_and_exact(trained_policy, batch):
    served = _openvino(trained_policy.model)
    x, t, c = _inputs(batch, seed=batch)
    with torch.inference_mode():
        out = served(x, t, c)
        eager = trained_policy.model(x, t, c)
    assert out.shape == (batch, 16, 2)
    assert (out - eager).abs().max() <= EXACT_TOLERANCE
    head = split_rows(batch)
    if head is None:
        size = static_batch(batch)
        assert size >= batch and size in STATIC_BATCHES and served._static[size] is not None
        assert size == batch or size <= 1.5 * batch + 1
    else:  # a large call between two sizes: the size below it plus the rest, nothing padded to 128
        assert (head, batch) == (96, 100) and sorted(s for s in served._static if s > 1) == [4, 96]


def test_openvino_dynamic_program_and_the_fallback_when_a_static_one_cannot_be_built(trained_policy, monkeypatch):
    dynamic = _openvino(trained_policy.model, static_shapes=False)
    x, t, c = _inputs(7)
    with torch.inference_mode():
        eager = trained_policy.model(x, t, c)
        assert (dynamic(x, t, c) - eager).abs().max() <= EXACT_TOLERANCE and not dynamic._static
        static = _openvino(trained_policy.model)
        monkeypatch.setattr(static, "_compile_static", lambda size: None)
        assert (static(x, t, c) - eager).abs().max() <= EXACT_TOLERANCE
    assert static._static[8] is None  # size 8 runs on the dynamic program


def test_openvino_static_programs_stop_at_their_weight_budget(trained_policy, monkeypatch):
    import policy_accel.model.engine as engine_module

    weights = sum(p.numel() * p.element_size() for p in trained_policy.model.parameters())
    monkeypatch.setattr(engine_module, "MAX_STATIC_BYTES", 2 * weights)
    served = _openvino(trained_policy.model)
    with torch.inference_mode():
        for batch in (2, 3, 4):
            x, t, c = _inputs(batch)
            assert (served(x, t, c) - trained_policy.model(x, t, c)).abs().max() <= EXACT_TOLERANCE
    assert [size for size, program in served._static.items() if program is not None] == [1, 2]
