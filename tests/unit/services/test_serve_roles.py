"""`dsv4 serve`'s role processes: how its prefix-cache and engine flags and the number of prefill workers reach the
roles."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv4.protocol import env
from dsv4.services import cli
from dsv4.services.serve.supervisor import role_processes

pytestmark = pytest.mark.unit


def _roles(tmp_path: Path, *flags: str, in_process: bool = False) -> dict[str, list[dict[str, str]]]:
    args = cli.build_parser().parse_args(["serve", *flags])
    out: dict[str, list[dict[str, str]]] = {}
    for role in role_processes(args, tmp_path / "model", "redis://127.0.0.1:1/0", in_process, tmp_path):
        out.setdefault(role.name, []).append(role.env)
    return out


def test_defaults_one_prefill_worker_with_the_prefix_cache_on(tmp_path: Path) -> None:
    roles = _roles(tmp_path)
    assert [len(roles[r]) for r in ("gateway", "prefill", "decode")] == [1, 1, 1]
    assert f"{env.PREFIX_CACHE}__ENABLED" not in roles["prefill"][0]
    assert f"{env.PREFIX_CACHE}__TIER__BUDGET_BYTES" not in roles["prefill"][0]  # the settings' default
    assert not any(name.startswith(env.ENGINE) for name in roles["decode"][0])  # the engine's defaults
    in_process = _roles(tmp_path, in_process=True)
    assert in_process["prefill"][0][f"{env.PREFIX_CACHE}__TIER__BUDGET_BYTES"] == "0"


def test_flags_reach_every_worker_and_the_gateway(tmp_path: Path) -> None:
    flags = ["--prefill-workers", "2", "--no-prefix-cache", "--prefix-cache-budget", "4096"]
    flags += ["--max-num-seqs", "64", "--max-num-batched-tokens", "2048"]
    roles = _roles(tmp_path, *flags, "--no-cuda-graphs", "--no-overlap-scheduling", "--speculative-mtp")
    assert len(roles["prefill"]) == 2
    assert len({r[env.POD_NAME] for r in roles["prefill"]}) == 2, "every worker has its own consumer name"
    for worker in [*roles["prefill"], *roles["decode"]]:
        assert worker[f"{env.PREFIX_CACHE}__ENABLED"] == "false"
        assert worker[f"{env.PREFIX_CACHE}__TIER__BUDGET_BYTES"] == "4096"
        assert worker[f"{env.ENGINE}__CUDA_GRAPHS"] == worker[f"{env.ENGINE}__OVERLAP_SCHEDULING"] == "false"
        assert worker[f"{env.ENGINE}__SPECULATIVE_MTP"] == "true"
        batch = (worker[f"{env.ENGINE}__MAX_NUM_SEQS"], worker[f"{env.ENGINE}__MAX_NUM_BATCHED_TOKENS"])
        assert batch == ("64", "2048")
    assert roles["gateway"][0][f"{env.PREFIX_ROUTING}__ENABLED"] == "false"


@pytest.mark.parametrize("flags", [["--prefill-workers", "0"], ["--prefix-cache-budget", "-1"]])
def test_bad_values_are_usage_errors(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["serve", *flags])
    assert exc.value.code == 2
    assert "must be >=" in capsys.readouterr().err


def test_tensor_parallel_makes_every_worker_a_group_of_its_own(tmp_path: Path) -> None:
    roles = _roles(tmp_path, "--tensor-parallel", "2", "--prefill-workers", "2")
    workers = [*roles["prefill"], *roles["decode"]]
    for worker in workers:
        assert {k: worker[k] for k in (env.WORLD_SIZE, env.NPROC_PER_NODE, env.NODE_RANK)} == {
            env.WORLD_SIZE: "2",
            env.NPROC_PER_NODE: "2",
            env.NODE_RANK: "0",
        }
        assert worker[f"{env.PARALLELISM}__TENSOR"] == "2"
    assert len({w[env.MASTER_PORT] for w in workers}) == 3, "every group rendezvous on its own port"
    assert env.WORLD_SIZE not in roles["gateway"][0]
    assert env.WORLD_SIZE not in _roles(tmp_path)["decode"][0], "one rank: no group env"


def test_data_parallel_makes_groups_of_tensor_times_data_ranks_with_experts_split(tmp_path: Path) -> None:
    roles = _roles(tmp_path, "--tensor-parallel", "2", "--data-parallel", "2")
    for worker in [*roles["prefill"], *roles["decode"]]:
        assert worker[env.WORLD_SIZE] == worker[env.NPROC_PER_NODE] == "4"
        assert worker[f"{env.PARALLELISM}__TENSOR"] == "2"
        assert worker[f"{env.PARALLELISM}__DATA"] == "2"
        assert worker[f"{env.PARALLELISM}__EXPERT"] == "true"


def test_mtp_reaches_the_workers_of_data_parallel_groups(tmp_path: Path) -> None:
    roles = _roles(tmp_path, "--speculative-mtp", "--tensor-parallel", "2", "--data-parallel", "2")
    for worker in [*roles["prefill"], *roles["decode"]]:
        assert worker[f"{env.PARALLELISM}__DATA"] == "2"
        assert worker[f"{env.ENGINE}__SPECULATIVE_MTP"] == "true"
