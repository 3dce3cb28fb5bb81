"""policy_accel/experiment/configurations.py: a configuration by name means the same setup in every entry point."""

from __future__ import annotations

import pytest

from policy_accel.errors import ConfigError
from policy_accel.experiment.configurations import (
    build_configuration,
    check_names,
    compose_configuration,
    configuration_names,
    families,
    resolve,
)


def test_names_are_the_experiment_files():
    names = configuration_names()
    assert {"seq_ddpm100", "newton_broyden_warm", "paradigms"} <= set(names) and names == sorted(names)
    assert check_names(["seq_ddim_10"]) == ["seq_ddim_10"]
    with pytest.raises(ConfigError, match=r"unknown configuration 'nope'; defined in .*: .*seq_ddim_10"):
        check_names(["seq_ddim_10", "nope"])


def test_a_family_file_stands_for_one_configuration_per_step_count():
    """seq_ddim is a family: its members are named by step count, composed from the one file, and the name is
    recorded; the family's name alone expands to every member; the old spelling points at the new one."""
    assert families()["seq_ddim"] == [1, 2, 3, 4, 5, 6, 8, 10, 12, 16]
    assert "seq_ddim_5" in configuration_names() and "seq_ddim" not in configuration_names()
    assert check_names(["seq_ddimtr", "paradigms"]) == [f"seq_ddimtr_{k}" for k in families()["seq_ddimtr"]] + [
        "paradigms"
    ]
    assert resolve("seq_unipc_7") == ("seq_unipc", ["policy.schedule.num_inference_steps=7"])  # any step count runs
    cfg = compose_configuration("seq_ddim_5")
    assert cfg.configuration == "seq_ddim_5" and cfg.policy.name == "ddim5" and cfg.solver.name == "sequential"
    assert cfg.policy.schedule.num_inference_steps == 5 and cfg.policy.schedule.kind == "ddim"
    cfg = compose_configuration("seq_ddimtr_3")
    assert cfg.policy.name == "ddimtr3" and cfg.policy.schedule.timestep_spacing == "trailing"
    with pytest.raises(ConfigError, match="did you mean seq_ddim_10"):
        resolve("seq_ddim10")
    with pytest.raises(ConfigError, match="seq_ddim is a family: name a member such as seq_ddim_1"):
        resolve("seq_ddim")


def test_a_configuration_builds_its_solver_sampler_and_warm_start():
    cfg, setup = build_configuration("newton_chord_warm", values={"threads": 1})
    assert setup.solver.name == "newton" and setup.solver.jacobian == "chord"
    assert setup.warm_start is True and setup.session.noise == "coupled" and setup.schedule.num_steps == 100
    assert cfg.check_exactness is True and setup.session.check_exactness


def test_overrides_win_over_the_configuration_and_values_replace_nodes():
    cfg, setup = build_configuration(
        "newton_chord_warm", ["policy=ddim16"], values={"threads": 1, "check_exactness": False}
    )
    assert cfg.policy.name == "ddim16" and setup.schedule.num_steps == 16
    assert not setup.session.check_exactness and setup.threads == 1
    _, shared = build_configuration("seq_ddim_4", values={"threads": 1}, policy=setup.policy)
    assert shared.policy is setup.policy and shared.schedule.num_steps == 4  # one network, its own sampler


def test_a_bad_group_or_value_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="configuration 'seq_ddim_10' with overrides \\['policy=ddim7'\\]") as err:
        compose_configuration("seq_ddim_10", ["policy=ddim7"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="threads=0 is not allowed"):
        build_configuration("seq_ddim_10", values={"threads": 0})
